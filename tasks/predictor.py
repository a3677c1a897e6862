"""Inference API: ``Predictor`` runs a backbone + head on images of any size (whole, slide, TTA).

``tasks.loading.load_predictor`` builds one from a training checkpoint, an export folder or one of Meta's released
head files. The task kind decides what ``Predictor.predict`` returns, one dict per image at its original size:

- ``segmentation``: ``{"probs": (K, H, W) float, "labels": (H, W) long}``
- ``depth``: ``{"depth": (H, W) float}`` in metres
- ``detection``: ``{"boxes": (k, 4) xyxy pixels, "scores": (k,), "labels": (k,)}``
- ``classification``: ``{"probs": (K,), "label": int}``
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dense_data.io import read_rgb, to_rgb_uint8
from dense_data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

from .inference import dense_inference
from .tta import ACTIVATIONS, TTA, preset_settings, resize, to_probs, tta_inference
from .padding import pad_for_head

KINDS = ("segmentation", "depth", "detection", "classification")
EXPORT_FORMAT = "dinov3-heads-export/1"
CONFIG_FILE, HEAD_FILE, BACKBONE_FILE = "config.yaml", "head.safetensors", "backbone.safetensors"


class ExportError(ValueError):
    """An export folder or checkpoint that cannot rebuild the model; the message names the file and key."""


# ------------------------------------------------------------------------------------------------- model
class DenseModel(nn.Module):
    """Backbone + head as one module: ``forward(images (B, 3, H, W) normalized)`` -> the head's prediction.

    Inputs are padded bottom/right to a multiple of the backbone stride (centred when the head's ``input_padding``
    is ``center``, see ``tasks.padding``) and the output is cut back:
    dense kinds give ``(B, C, H, W)`` at the input size, detection a list of dicts with boxes clipped to
    the input, classification ``(B, K)`` logits.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; valid: {', '.join(KINDS)}")
        self.backbone, self.head, self.kind = backbone, head, kind

    @property
    def output_stride(self) -> int | None:
        """Pixels per cell of the head's own dense output (``head.predict_native``); None if it has none."""
        return getattr(self.head, "output_stride", None) if hasattr(self.head, "predict_native") else None

    @property
    def upsamples_native(self) -> bool:
        """Whether the dense prediction is the native output over the padded input upsampled bilinearly
        (``align_corners=False``) and cut to the input (the head's ``predict_upsamples_native``, bottom/right
        padding): a caller may then take ``forward(native=True, cut=False)`` and upsample it itself."""
        return (self.output_stride is not None and getattr(self.head, "predict_upsamples_native", False)
                and getattr(self.head, "input_padding", "corner") != "center")

    def forward(self, images: torch.Tensor, native: bool = False, cut: bool = True):
        """``native=True`` (dense heads with ``predict_native``): the output on the head's own grid,
        ``(B, C, ceil(H / s), ceil(W / s))`` with ``s = output_stride``, instead of upsampled to ``(H, W)``;
        with ``cut=False`` the whole grid of the padded input."""
        height, width = images.shape[-2:]
        images, (top, left) = pad_for_head(images, self.backbone.pad_to, self.head)
        features = self.backbone(images)  # pads bottom/right to the backbone stride
        outputs = self.head(features, features.padded_size)
        if native:
            stride = self.output_stride
            if stride is None:
                raise ValueError(f"{type(self.head).__name__} has no native-resolution output (predict_native, "
                                 "output_stride): use stitch='full'")
            grid = self.head.predict_native(outputs)
            return grid[..., :-(-height // stride), :-(-width // stride)] if cut else grid
        prediction = self.head.predict(outputs, features.padded_size)
        if self.kind == "detection":
            limit = torch.tensor([width, height, width, height], dtype=torch.float32)
            return [dict(p, boxes=torch.minimum(p["boxes"].clamp(min=0), limit.to(p["boxes"].device)))
                    for p in prediction]
        if self.kind == "classification":
            return prediction
        return prediction[..., top:top + height, left:left + width]


# ---------------------------------------------------------------------------------------------- images
def as_rgb(image) -> np.ndarray:
    """A path, PIL image, array or tensor as ``(H, W, 3)`` uint8 RGB.

    Arrays are ``(H, W)``, ``(H, W, 1|3|4)``; tensors ``(H, W)`` or ``(1|3|4, H, W)`` (torchvision layout).
    Grayscale is repeated, alpha dropped; integer images with values above 255 (16-bit) are scaled from
    0-65535 (as ``dense_data.io.to_rgb_uint8``), floats are taken as 0-1.
    """
    if isinstance(image, (str, Path)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return to_rgb_uint8(image)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.permute(1, 2, 0)
        elif array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
            array = array.permute(1, 2, 0)  # ambiguous tiny image: tensors are channels-first
        image = array.numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot read an image of shape {array.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.nan_to_num(array) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:  # 16-bit: as dense_data.io.to_rgb_uint8 converts 16-bit files
        scale = 65535.0 if array.max(initial=0) > 255 else 255.0
        array = np.clip(array.astype(np.float64) / scale * 255.0, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    array = np.ascontiguousarray(array[..., :3])
    return array if array.flags.writeable else array.copy()


def _as_list(images) -> tuple[list, bool]:
    """``(items, single)``: a batch tensor ``(B, C, H, W)`` or a list is many images, anything else one."""
    if isinstance(images, (list, tuple)):
        return list(images), False
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images), False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False
    return [images], True


# ------------------------------------------------------------------------------------------- predictor
class Predictor:
    """Runs a ``DenseModel`` on images of any size and maps the results back to each image's original size.

    Args:
        model: a ``DenseModel`` (or any module mapping normalized ``(B, 3, H, W)`` to the kind's output).
        kind: ``segmentation`` | ``depth`` | ``detection`` | ``classification``.
        num_classes, class_names: the label space (None for depth).
        mean, std: input normalization.
        eval: defaults of ``predict``: ``mode``, ``crop``, ``stride``, ``batch_size``, ``small_image``
            (``pad`` | ``shrink``), ``activation`` (``auto`` | ``softmax`` | ``normalize``), ``tta`` (a dict of
            ``TTA`` fields) or ``flip``, ``stitch`` (``full`` | ``native``); ``preset``: a name in ``tasks.tta.EVAL_PRESETS`` whose values come first.
        score_type: segmentation scores are ``logits`` (softmax gives probabilities) or ``scores``
            (non-negative, e.g. Mask2Former; normalized to sum 1). Default: the head's ``score_type``
            attribute, else ``scores`` for Mask2Former heads and ``logits`` otherwise.
        config: the resolved configuration the model was built from (used by ``tasks.export``).
    """

    def __init__(self, model: nn.Module, kind: str, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, eval: dict | None = None, score_type: str | None = None,
                 device: str | torch.device = "cpu", config: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; valid: {', '.join(KINDS)}")
        self.kind, self.num_classes = kind, num_classes
        self.class_names = list(class_names) if class_names else (
            [f"class_{i}" for i in range(num_classes)] if num_classes else None)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        eval = dict(eval or {})
        preset = preset_settings(eval["preset"]) if eval.get("preset") else {}
        self.eval_settings = {"mode": "whole", "crop": 512, "stride": 341, "batch_size": 8, "small_image": "pad",
                              "activation": "auto", "stitch": "full", **preset, **eval}
        head = getattr(model, "head", None)
        self.score_type = score_type or getattr(head, "score_type", None) or (
            "scores" if "Mask2Former" in type(head).__name__ else "logits")
        if self.score_type not in ("logits", "scores"):
            raise ValueError(f"score_type must be 'logits' or 'scores', got {self.score_type!r}")
        self.config = config or {}
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def to(self, device: str | torch.device) -> Predictor:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ------------------------------------------------------------------------------------------ helpers
    def preprocess(self, image) -> torch.Tensor:
        """Any supported image as a normalized ``(3, H, W)`` float tensor (on the CPU)."""
        return normalize(as_rgb(image), self.mean, self.std)

    def to_probs(self, scores: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """Segmentation scores ``(K, H, W)`` averaged over windows -> class probabilities (``tasks.tta.to_probs``)."""
        return to_probs(scores, self.score_type, activation or self.eval_settings["activation"])

    def _run(self, images: torch.Tensor):
        with torch.inference_mode():
            return self.model(images.to(self.device, non_blocking=True))

    def _run_native(self, images: torch.Tensor, cut: bool = True):
        with torch.inference_mode():
            return self.model(images.to(self.device, non_blocking=True), native=True, cut=cut)

    # ---------------------------------------------------------------------------------------------- API
    @torch.inference_mode()
    def predict(self, images, mode: str | None = None, crop: int | Sequence[int] | None = None,
                stride: int | Sequence[int] | None = None, tta=None, batch_size: int | None = None,
                out_device: str | torch.device | None = "cpu", return_probs: bool = True,
                small_image: str | None = None, activation: str | None = None, preset: str | None = None,
                stitch: str | None = None):
        """Predict full-resolution results for one image or a list of images (sizes may differ).

        Args:
            images: a path, PIL image, ``(H, W[, C])`` array, ``(C, H, W)`` tensor, or a list of them
                (a ``(B, C, H, W)`` tensor counts as a list).
            mode: ``whole`` (one forward per image, same sizes batched) or ``slide`` (mmseg sliding window:
                window outputs averaged per pixel before the softmax). Default: the checkpoint's eval mode.
            crop, stride: sliding-window size and step (int or ``(h, w)``).
            tta: ``False`` (none), ``True`` (flip), a dict of ``TTA`` fields (``flip``, ``scales``, ``short_side``,
                ``multiple``, ``antialias``) or a ``TTA``; ``None``: the eval setting (``tta``, or ``eval_flip`` of a
                depth task), else none.
            batch_size: crops (or whole images) per forward, across all windows, views and images.
            out_device: where window sums, TTA averages and results live (``"cpu"`` bounds accelerator
                memory on very large images); ``None``: the model's device.
            return_probs: segmentation: keep the ``(K, H, W)`` probabilities (else only the label map: without
                TTA and with a softmax, the argmax of the window mean, built in bands of rows where the head
                allows, see ``tasks.inference.WindowMean.labels``).
            small_image: ``pad`` (ours) or ``shrink`` (Meta's) images smaller than the sliding window.
            activation: segmentation scores of each view -> probabilities before the views are averaged:
                ``softmax`` (Meta), ``normalize`` (scores / their sum) or ``auto`` (softmax of logits, normalized
                Mask2Former scores).
            preset: a name in ``tasks.tta.EVAL_PRESETS`` (e.g. ``meta_m2f``): its settings replace the
                defaults; arguments given here still win.
            stitch: ``slide`` mode: ``full`` (windows' outputs upsampled to the crop, averaged at the image's
                resolution: mmseg / Meta; a linear head's windows are upsampled while stitched, the same values)
                or ``native`` (averaged on the head's own coarser grid, e.g. 1/16 for a linear head, 1/4 for
                Mask2Former, then upsampled once: faster, slightly different near window edges). Default: the checkpoint's eval setting, else ``full``.

        Returns:
            One dict per image (a single dict for a single image), see the module docstring.
        """
        items, single = _as_list(images)
        settings = {**self.eval_settings, **(preset_settings(preset) if preset else {})}
        mode = mode or settings["mode"]
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        crop = crop or settings["crop"]
        stride = stride or settings["stride"]
        batch_size = int(batch_size or settings["batch_size"])
        small_image = small_image or settings["small_image"]
        activation = activation or settings["activation"]
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if tta is None:
            tta = settings["tta"] if settings.get("tta") is not None else bool(settings.get("flip", False))
        tta = TTA.make(tta)
        stitch = stitch or settings["stitch"]
        if stitch not in ("full", "native"):
            raise ValueError(f"stitch must be 'full' or 'native', got {stitch!r}")
        tensors = [self.preprocess(item) for item in items]
        if self.kind == "detection":
            results = self._detect(tensors, mode, tta, batch_size)
        elif self.kind == "classification":
            results = self._classify(tensors, tta)
        else:
            results = self._dense(tensors, mode, crop, stride, tta, batch_size, out_device, return_probs,
                                  small_image, activation, stitch)
        return results[0] if single else results

    def _dense(self, tensors, mode, crop, stride, tta, batch_size, out_device, return_probs, small_image,
               activation, stitch) -> list[dict]:
        value = (lambda scores: self.to_probs(scores, activation)) if self.kind == "segmentation" else None
        fn, output_stride, upsample = self._run, 1, False
        if mode == "slide" and stitch == "full" and getattr(self.model, "upsamples_native", False):
            # Meta's stitching, each window upsampled as it is added (see tasks.inference.WindowMean)
            fn, output_stride, upsample = partial(self._run_native, cut=False), self.model.output_stride, True
        elif mode == "slide" and stitch == "native":
            output_stride = getattr(self.model, "output_stride", None)
            if output_stride is None:
                raise ValueError(f"stitch='native' needs a head with a native-resolution output; "
                                 f"{type(getattr(self.model, 'head', self.model)).__name__} has none: use stitch='full'")
            fn = self._run_native
        softmax = activation == "softmax" or (activation == "auto" and self.score_type == "logits")
        if self.kind == "segmentation" and not return_probs and tta.is_identity and softmax:
            # labels only: the argmax of the window mean is that of its softmax
            labels = dense_inference(fn, tensors, mode, crop, stride, batch_size, out_device, small_image,
                                     output_stride, upsample, labels=True)
            return [{"labels": label.cpu()} for label in labels]
        means = tta_inference(fn, tensors, tta, mode, crop, stride, batch_size, out_device, small_image, value,
                              output_stride=output_stride, upsample=upsample)
        results = []
        for mean in means:
            if self.kind == "segmentation":
                result = {"labels": mean.argmax(0)}
                if return_probs:
                    result["probs"] = mean
            else:
                result = {"depth": mean[0]}
            results.append({k: v.cpu() for k, v in result.items()})
        return results

    def _detect(self, tensors, mode, tta, batch_size) -> list[dict]:
        if mode != "whole":
            raise ValueError("detection runs on whole images: use mode='whole'")
        if not tta.is_identity:
            raise ValueError("test-time augmentation is not supported for detection (it needs box fusion)")
        results: list[dict | None] = [None] * len(tensors)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(tensors):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(index)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                outputs = self._run(torch.stack([tensors[i] for i in chunk]))
                for i, output in zip(chunk, outputs):
                    results[i] = {k: v.detach().cpu() for k, v in output.items()}
        return results

    def _classify(self, tensors, tta) -> list[dict]:
        results = []
        for image in tensors:
            total = 0
            for scale, flip in tta.views():
                view = resize(image, tta.view_size(image.shape[-2:], scale), tta.antialias)
                total = total + self._run((view.flip(-1) if flip else view)[None])[0].float().softmax(-1).cpu()
            probs = total / len(tta.views())
            results.append({"probs": probs, "label": int(probs.argmax())})
        return results
