"""Monocular depth: any head whose ``predict`` gives metric depth ``(B, 1, H, W)`` (e.g. ``heads.dpt.DPTHead``)."""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import DenseTask
from .inference import dense_inference
from .metrics.depth import METRIC_NAMES, DepthMetrics
from .visualize import denormalize, resize_picture, save_panels
from .visualize_depth import depth_panel


class DepthTask(DenseTask):
    """Trains on ``depth`` targets (metres, 0 = invalid); validates with the NYUv2 / KITTI depth metrics.

    Validation runs the dense depth over whole images or a sliding window (windows averaged in depth
    space), optionally averaged with the prediction of the horizontally flipped input, resizes it
    bilinearly to the ground-truth size and scores it with :class:`~tasks.metrics.depth.DepthMetrics`.

    Args:
        eval_mode: ``whole`` or ``slide`` (windows of ``eval_crop`` every ``eval_stride``, int or ``[h, w]``).
        eval_batch_size: images (whole) or crops (slide) per forward in validation.
        eval_flip: average the prediction with the un-flipped prediction of the flipped image.
        min_depth, max_depth: valid ground-truth range of the metrics; predictions are clamped to it.
        eigen_crop: score only inside the NYU Eigen crop (scaled to the ground-truth size).
        align: ``none`` (metric depth), ``median`` or ``least_squares`` per-image alignment before scoring.
        max_inclusive: score ground truth equal to ``max_depth`` (Meta drops it: ``False``).
        crop_rounding: ``floor`` (Meta) or ``round``: how the Eigen crop bounds are scaled to the target size.
        num_vis: images in the validation picture (image | ground truth | prediction per row, one colour
            scale per row: the valid ground-truth range).
    """

    targets = ("depth",)
    kind = "depth"

    def __init__(self, *args, eval_mode: str = "whole", eval_crop: int | Sequence[int] = 512,
                 eval_stride: int | Sequence[int] = 341, eval_batch_size: int = 8, eval_flip: bool = False,
                 min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False, align: str = "none",
                 max_inclusive: bool = False, crop_rounding: str = "floor", num_vis: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {eval_mode!r}")
        self.eval_mode, self.eval_batch_size, self.eval_flip = eval_mode, eval_batch_size, bool(eval_flip)
        self.eval_crop = eval_crop if isinstance(eval_crop, int) else tuple(eval_crop)
        self.eval_stride = eval_stride if isinstance(eval_stride, int) else tuple(eval_stride)
        self.num_vis = num_vis
        self.val_metrics = DepthMetrics(min_depth, max_depth, eigen_crop, align, max_inclusive, crop_rounding)
        self._vis_rows: list[list[np.ndarray]] = []

    def dense_tta(self, images: torch.Tensor) -> torch.Tensor:
        """Depth ``(B, 1, H, W)`` of ``(B, 3, H, W)`` images, averaged with the flipped view if ``eval_flip``."""
        depth = self.dense(images)
        if self.eval_flip:
            depth = 0.5 * (depth + self.dense(images.flip(-1)).flip(-1))
        return depth

    def predict_depth(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Depth ``(1, H_i, W_i)`` in metres for each normalized ``(3, H_i, W_i)`` image."""
        return dense_inference(self.dense_tta, images, self.eval_mode, self.eval_crop, self.eval_stride,
                               self.eval_batch_size)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.network_images(batch)
        for image, depth, gt, meta in zip(images, self.predict_depth(images), batch["depth"], batch["meta"]):
            height, width = meta.get("orig_size", gt.shape[-2:])
            gt = gt[:height, :width]
            if depth.shape[-2:] != gt.shape:
                depth = F.interpolate(depth[None].float(), gt.shape, mode="bilinear", align_corners=False)[0]
            self.val_metrics.update(depth[None], gt[None])
            if len(self._vis_rows) < self.num_vis and self.vis_dir is not None:
                picture = resize_picture(denormalize(image), tuple(gt.shape))
                self._vis_rows.append([depth_panel(picture, gt.float().cpu().numpy(),
                                                   depth[0].float().cpu().numpy())])

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        for name in METRIC_NAMES:
            self.log(f"val/{name}", results[name], prog_bar=name in ("abs_rel", "delta1"), sync_dist=False)
        if self._vis_rows and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            save_panels(self._vis_rows, self.vis_dir / f"val_step{self.global_step:07d}.png")
        self._vis_rows = []
