"""Test-time augmentation and evaluation presets for dense predictions.

A view of an image is a resized (and maybe mirrored) copy. Its dense output is resized back to the output size
of the image, un-mirrored, turned into probabilities (segmentation) and averaged over the views
(:func:`tta_inference`). ``EVAL_PRESETS`` names complete evaluation settings, e.g. ``meta_m2f``: Meta's
evaluation of its released Mask2Former head (short side 896, window 896 / 596, 5 scales x flip).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .inference import SMALL_IMAGE, DenseFn, dense_inference

ACTIVATIONS = ("auto", "softmax", "normalize")

# Evaluation settings by name (``Predictor.predict(preset=...)``, ``predict.py eval=...``,
# ``module.eval_preset``). Keys as in ``Predictor.eval_settings``.
EVAL_PRESETS: dict[str, dict] = {
    # Meta's linear segmentation eval (dinov3/eval/segmentation, config-ade20k-linear-training.yaml): short side
    # resized to the crop (512), sliding window 512 / 341 shrunk to small images, softmax.
    "meta_linear": {"mode": "slide", "crop": 512, "stride": 341, "small_image": "shrink", "activation": "softmax",
                    "tta": {"flip": False, "scales": [1.0], "short_side": 512, "multiple": 1, "antialias": True}},
    # Meta's evaluation of its released Mask2Former head (config-ade20k-m2f-inference.yaml): short side
    # 896 x (0.9, 0.95, 1.0, 1.05, 1.1), sides below 896 rounded up to a multiple of 32, each view and its mirror
    # slid with 896 / 596 windows, the window-averaged M2F scores softmaxed per view, probabilities averaged.
    "meta_m2f": {"mode": "slide", "crop": 896, "stride": 596, "small_image": "shrink", "activation": "softmax",
                 "tta": {"flip": True, "scales": [0.9, 0.95, 1.0, 1.05, 1.1], "short_side": 896, "multiple": 32,
                         "antialias": True}},
}


def preset_settings(name: str) -> dict:
    """A copy of the named evaluation settings; an unknown name lists the valid ones."""
    if name not in EVAL_PRESETS:
        raise ValueError(f"unknown evaluation preset {name!r}; valid: {', '.join(EVAL_PRESETS)}")
    preset = EVAL_PRESETS[name]
    return {k: dict(v) if isinstance(v, dict) else v for k, v in preset.items()}


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: each image is predicted at every ``scale``, also mirrored when ``flip``.

    Attributes:
        flip: add the horizontal mirror of every view.
        scales: view sizes relative to the image (``short_side`` None) or to ``short_side``.
        short_side: if set, a view's short side is ``int(short_side * scale)`` and its long side keeps the
            aspect ratio (Meta's ``FixedSideResize``); None: both sides of the image times ``scale``.
        multiple: with ``short_side``, the short side of views with ``scale < 1`` is rounded up to a multiple
            of this (Meta: 32).
        antialias: filter when shrinking an image (as PIL's bilinear resize in Meta's transforms does);
            False: plain bilinear sampling (mmseg's test-time resize).
    """

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    short_side: int | None = None
    multiple: int = 1
    antialias: bool = False

    @classmethod
    def make(cls, tta) -> TTA:
        """Accepts ``None``/``False`` (none), ``True`` (flip), a ``TTA``, or a dict of its fields."""
        if tta is None or tta is False:
            return cls()
        if tta is True:
            return cls(flip=True)
        if isinstance(tta, cls):
            return tta
        if isinstance(tta, dict):
            fields = ("flip", "scales", "short_side", "multiple", "antialias")
            unknown = set(tta) - set(fields)
            if unknown:
                raise ValueError(f"unknown TTA keys {sorted(unknown)}; valid: {', '.join(fields)}")
            scales = tuple(float(s) for s in (tta.get("scales") or (1.0,)))
            if any(s <= 0 for s in scales):
                raise ValueError(f"TTA scales must be positive, got {scales}")
            short_side = tta.get("short_side")
            if short_side is not None and int(short_side) <= 0:
                raise ValueError(f"TTA short_side must be positive, got {short_side}")
            multiple = int(tta.get("multiple") or 1)
            if multiple < 1:
                raise ValueError(f"TTA multiple must be >= 1, got {multiple}")
            return cls(flip=bool(tta.get("flip", False)), scales=scales,
                       short_side=None if short_side is None else int(short_side), multiple=multiple,
                       antialias=bool(tta.get("antialias", False)))
        raise TypeError(f"tta must be None, a bool, a dict or a TTA, got {type(tta).__name__}")

    def views(self) -> list[tuple[float, bool]]:
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    @property
    def is_identity(self) -> bool:
        return self.views() == [(1.0, False)] and self.short_side is None

    def view_size(self, size: Sequence[int], scale: float) -> tuple[int, int]:
        """``(h, w)`` of the view of an image of ``size`` at ``scale``."""
        if self.short_side is None:
            return scaled_size(size, scale)
        short = int(self.short_side * scale)
        if scale < 1:
            short = math.ceil(short / self.multiple) * self.multiple
        height, width = int(size[0]), int(size[1])
        if height > width:
            return int(short * height / width + 0.5), short
        return short, int(short * width / height + 0.5)


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


def resize(tensor: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of ``(C, H, W)`` (align_corners=False; ``antialias`` filters when shrinking)."""
    size = (int(size[0]), int(size[1]))
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]


def to_probs(scores: torch.Tensor, score_type: str = "logits", activation: str = "auto") -> torch.Tensor:
    """Class scores ``(K, H, W)`` -> probabilities over ``K``.

    ``activation``: ``softmax`` (Meta's, for logits and Mask2Former scores alike), ``normalize`` (non-negative
    scores divided by their sum) or ``auto`` (softmax of ``logits``, normalized ``scores``).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if activation == "auto":
        activation = "softmax" if score_type == "logits" else "normalize"
    if activation == "softmax":
        return scores.float().softmax(0)
    scores = scores.float().clamp(min=0)
    return scores / scores.sum(0, keepdim=True).clamp(min=1e-12)


def make_views(images: list[torch.Tensor], tta: TTA) -> list[torch.Tensor]:
    """Every view of every image, ``(3, h, w)`` each, image by image in ``tta.views()`` order."""
    views = []
    for image in images:
        for scale, flip in tta.views():
            view = resize(image, tta.view_size(image.shape[-2:], scale), tta.antialias)
            views.append(view.flip(-1) if flip else view)
    return views


def average_views(outputs: list[torch.Tensor], tta: TTA, sizes: Sequence[Sequence[int]],
                  value: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  out_device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Per image: the dense outputs of its views (``make_views`` order) resized (bilinear) to ``sizes[i]``,
    un-mirrored, passed through ``value`` (e.g. ``to_probs``; default identity) and averaged."""
    views = tta.views()
    if len(outputs) != len(views) * len(sizes):
        raise ValueError(f"{len(outputs)} view outputs for {len(sizes)} images of {len(views)} views each")
    means = []
    for index, size in enumerate(sizes):
        total = None
        for (_, flip), output in zip(views, outputs[index * len(views):(index + 1) * len(views)]):
            if out_device is not None:
                output = output.to(out_device)
            output = resize(output.float(), size)
            output = output.flip(-1) if flip else output
            output = value(output) if value is not None else output
            total = output if total is None else total + output
        means.append(total / len(views))
    return means


def tta_inference(fn: DenseFn, images: list[torch.Tensor], tta: TTA, mode: str, crop, stride, batch_size: int = 8,
                  out_device: torch.device | str | None = None, small_image: str = "pad",
                  value: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  out_sizes: Sequence[Sequence[int]] | None = None, output_stride: int = 1,
                  upsample: bool = False) -> list[torch.Tensor]:
    """The mean over the views of each image of ``value(output)``, at the image's size (or ``out_sizes[i]``).

    ``output_stride`` > 1 (slide only): ``fn`` gives outputs on a grid that coarse, stitched there and upsampled once
    (``stitch="native"``, see :func:`tasks.inference.slide_inference`); with ``upsample`` each window's coarse
    output is upsampled to full resolution as it is stitched (``stitch="full"`` without upsampled windows in memory).

    All views of all images go through one :func:`dense_inference` call (their windows share batches); see
    :func:`make_views` and :func:`average_views`. Meta's order of operations: window outputs averaged, resized to
    the output size, un-mirrored, softmaxed (``value``), averaged over views.
    """
    if small_image not in SMALL_IMAGE:
        raise ValueError(f"small_image must be one of {', '.join(SMALL_IMAGE)}, got {small_image!r}")
    outputs = dense_inference(fn, make_views(images, tta), mode, crop, stride, batch_size, out_device, small_image,
                              output_stride, upsample)
    sizes = out_sizes if out_sizes is not None else [tuple(image.shape[-2:]) for image in images]
    return average_views(outputs, tta, sizes, value, out_device)
