"""Semantic segmentation: any head whose ``predict`` gives per-pixel class scores."""

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .base import DenseTask
from .inference import SMALL_IMAGE
from .metrics.segmentation import SegmentationMetrics
from .tta import ACTIVATIONS, TTA, preset_settings, to_probs, tta_inference
from .visualize import colorize_labels, denormalize, resize_picture, save_panels


class SegmentationTask(DenseTask):
    """Trains on ``mask`` targets; validates with mIoU / pixel accuracy over the whole set.

    Args:
        eval_mode: ``whole`` or ``slide`` (sliding window of ``eval_crop`` every ``eval_stride``).
        eval_batch_size: crops per forward in sliding-window validation.
        eval_small_image: ``pad`` (ours) or ``shrink`` (Meta's) images smaller than the sliding window.
        eval_tta: test-time augmentation, a dict of ``tasks.tta.TTA`` fields (``flip``, ``scales``, ``short_side``,
            ``multiple``, ``antialias``) or None.
        eval_activation: scores -> probabilities of each TTA view before averaging (``auto`` | ``softmax`` |
            ``normalize``, see ``tasks.tta.to_probs``).
        eval_preset: a name in ``tasks.tta.EVAL_PRESETS`` (e.g. ``meta_m2f``): its values replace the eval_* ones.
        eval_stitch: sliding-window stitching, ``full`` (windows upsampled, averaged at full resolution: Meta)
            or ``native`` (averaged on the head's own grid, upsampled once; see ``tasks.inference``).
        num_vis: images in the validation picture (image | ground truth | prediction per row).
    """

    targets = ("mask",)

    def __init__(self, *args, eval_mode: str = "whole", eval_crop: int = 512, eval_stride: int = 341,
                 eval_batch_size: int = 8, eval_small_image: str = "pad", eval_tta: dict | None = None,
                 eval_activation: str = "auto", eval_preset: str | None = None,
                 eval_stitch: str = "full", num_vis: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        preset = eval_preset and preset_settings(eval_preset)
        if preset:
            eval_mode, eval_crop, eval_stride = preset["mode"], preset["crop"], preset["stride"]
            eval_small_image, eval_activation, eval_tta = preset["small_image"], preset["activation"], preset["tta"]
        if eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {eval_mode!r}")
        if eval_small_image not in SMALL_IMAGE:
            raise ValueError(f"eval_small_image must be one of {', '.join(SMALL_IMAGE)}, got {eval_small_image!r}")
        if eval_activation not in ACTIVATIONS:
            raise ValueError(f"eval_activation must be one of {', '.join(ACTIVATIONS)}, got {eval_activation!r}")
        if eval_stitch not in ("full", "native"):
            raise ValueError(f"eval_stitch must be 'full' or 'native', got {eval_stitch!r}")
        if eval_stitch == "native" and not hasattr(self.head, "predict_native"):
            raise ValueError(f"eval_stitch=native needs a head with a native-resolution output; "
                             f"{type(self.head).__name__} has none")
        self.eval_stitch = eval_stitch
        self.eval_mode, self.eval_crop, self.eval_stride = eval_mode, eval_crop, eval_stride
        self.eval_small_image, self.eval_activation = eval_small_image, eval_activation
        self.eval_tta = TTA.make(dict(eval_tta) if eval_tta else None)
        self.eval_batch_size, self.num_vis = eval_batch_size, num_vis
        self.val_metrics = SegmentationMetrics(self.num_classes)
        self._vis_rows: list[list[np.ndarray]] = []

    def predict_scores(self, images: list[torch.Tensor], sizes: list[tuple[int, int]] | None = None
                       ) -> list[torch.Tensor]:
        """Class scores ``(K, H_i, W_i)`` for each normalized ``(3, H_i, W_i)`` image (at ``sizes[i]`` if given).

        Without TTA: the window-averaged scores; with TTA: the probabilities averaged over the views.
        """
        score_type = getattr(self.head, "score_type", None) or (
            "scores" if "Mask2Former" in type(self.head).__name__ else "logits")
        value = None if self.eval_tta.is_identity else (
            lambda scores: to_probs(scores, score_type, self.eval_activation))
        native = self.eval_stitch == "native" and self.eval_mode == "slide"
        # full stitching of a head whose prediction is its upsampled native output: windows upsampled as stitched
        upsample = (self.eval_mode == "slide" and not native and getattr(self.head, "predict_upsamples_native", False)
                    and getattr(self.head, "input_padding", "corner") != "center")
        fn = self.dense_native if native else partial(self.dense_native, cut=False) if upsample else self.dense
        return tta_inference(fn, images, self.eval_tta, self.eval_mode, self.eval_crop, self.eval_stride,
                             self.eval_batch_size, small_image=self.eval_small_image, value=value, out_sizes=sizes,
                             output_stride=self.head.output_stride if native or upsample else 1, upsample=upsample)

    def dense_native(self, images: torch.Tensor, cut: bool = True) -> torch.Tensor:
        """Class scores on the head's own grid, ``(B, K, ceil(H / s), ceil(W / s))`` with ``s = head.output_stride``
        (``cut=False``: the whole grid of the input padded to the backbone's stride)."""
        features = self.backbone(images)
        scores = self.head.predict_native(self.head(features, features.padded_size))
        stride = self.head.output_stride
        return scores[..., :-(-images.shape[-2] // stride), :-(-images.shape[-1] // stride)] if cut else scores

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.network_images(batch)
        sizes = [tuple(meta["orig_size"]) for meta in batch["meta"]]
        for image, scores, mask, meta in zip(images, self.predict_scores(images, sizes), batch["mask"], batch["meta"]):
            height, width = meta["orig_size"]
            mask = mask[:height, :width]
            if scores.shape[-2:] != mask.shape:
                scores = F.interpolate(scores[None], mask.shape, mode="bilinear", align_corners=False)[0]
            prediction = scores.argmax(0)
            self.val_metrics.update(prediction[None], mask[None])
            if len(self._vis_rows) < self.num_vis and self.vis_dir is not None:
                picture = resize_picture(denormalize(image), tuple(mask.shape))
                self._vis_rows.append([picture, colorize_labels(mask.cpu().numpy(), self.num_classes),
                                       colorize_labels(prediction.cpu().numpy(), self.num_classes)])

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log("val/mIoU", results["mIoU"], prog_bar=True, sync_dist=False)
        self.log("val/acc", results["acc"], sync_dist=False)
        if self._vis_rows and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            save_panels(self._vis_rows, self.vis_dir / f"val_step{self.global_step:07d}.png")
        self._vis_rows = []
