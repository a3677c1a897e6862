"""Monocular depth metrics, computed per image and averaged over images (the NYUv2 / KITTI convention).

Per image, over the valid pixels ``V`` (``min_depth < gt < max_depth`` as Meta's evaluation drops ``gt >= max``,
or ``<= max_depth`` with ``max_inclusive``; finite; optionally inside the Eigen crop),
after optional per-image alignment and then clamping the prediction ``p`` to ``[min_depth, max_depth]``::

    abs_rel  = mean(|p - g| / g)
    sq_rel   = mean((p - g)^2 / g)
    rmse     = sqrt(mean((p - g)^2))
    rmse_log = sqrt(mean((ln p - ln g)^2))
    log10    = mean(|log10 p - log10 g|)
    silog    = 100 * sqrt(mean(d^2) - mean(d)^2),  d = ln p - ln g   (Meta's / BTS's x100 form, lambda = 1)
    delta_k  = mean(max(p / g, g / p) < 1.25^k),  k = 1, 2, 3

Images without a valid pixel are skipped (not counted). :class:`DepthMetrics` keeps the sums of the per-image
values and the image count as ``dist_reduce_fx="sum"`` states, so DDP gives the exact mean over all images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")
ALIGN_MODES = ("none", "median", "least_squares")

# Eigen et al.'s evaluation crop for NYUv2, on a 480x640 image: rows 45:471, cols 41:601.
EIGEN_CROP_480x640 = (45, 471, 41, 601)


CROP_ROUNDING = ("floor", "round")


def eigen_crop_mask(height: int, width: int, device: torch.device | str | None = None,
                    rounding: str = "floor") -> Tensor:
    """``(H, W)`` bool, True inside the NYU Eigen crop scaled from 480x640.

    ``rounding``: ``floor`` (Meta's ``int(v / 480 * H)``) or ``round`` (half up) for each scaled bound.
    """
    if rounding not in CROP_ROUNDING:
        raise ValueError(f"crop rounding must be one of {CROP_ROUNDING}, got {rounding!r}")

    def scale(v: int, num: int, den: int) -> int:
        return int(v / den * num) if rounding == "floor" else int(math.floor(v * num / den + 0.5))

    r0, r1, c0, c1 = EIGEN_CROP_480x640
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[scale(r0, height, 480) : scale(r1, height, 480), scale(c0, width, 640) : scale(c1, width, 640)] = True
    return mask


def valid_depth_mask(
    gt: Tensor, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False,
    max_inclusive: bool = False, crop_rounding: str = "floor",
) -> Tensor:
    """``(..., H, W)`` metres -> bool mask ``finite & min_depth < gt < max_depth`` (``<=`` with ``max_inclusive``)
    [& Eigen crop with ``crop_rounding``]."""
    below = gt <= max_depth if max_inclusive else gt < max_depth
    mask = torch.isfinite(gt) & (gt > min_depth) & below
    if eigen_crop:
        mask = mask & eigen_crop_mask(gt.shape[-2], gt.shape[-1], gt.device, crop_rounding)
    return mask


def _median(x: Tensor) -> Tensor:
    """Median of a 1-D tensor, averaging the two middle values for an even count (as numpy does)."""
    s, _ = torch.sort(x)
    n = s.numel()
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def align_median(pred: Tensor, gt: Tensor, mask: Tensor) -> Tensor:
    """Scale ``pred`` by ``median(gt[mask]) / median(pred[mask])`` (shapes ``(H, W)``)."""
    scale = _median(gt[mask]) / _median(pred[mask]).clamp_min(1e-12)
    return pred * scale


def align_least_squares(pred: Tensor, gt: Tensor, mask: Tensor) -> Tensor:
    """``s * pred + t`` with ``(s, t) = argmin sum_{mask} (s * pred + t - gt)^2`` (closed form, float64)."""
    p, g = pred[mask].double(), gt[mask].double()
    pm, gm = p.mean(), g.mean()
    var = ((p - pm) ** 2).mean()
    cov = ((p - pm) * (g - gm)).mean()
    s = torch.where(var > 0, cov / var.clamp_min(1e-300), torch.zeros_like(var))
    t = gm - s * pm
    return (pred.double() * s + t).to(pred.dtype)


def depth_errors(pred: Tensor, gt: Tensor) -> dict[str, Tensor]:
    """Metrics of 1-D ``pred`` and ``gt`` (valid pixels only, both > 0) -> dict of 0-dim float64 tensors."""
    p, g = pred.double(), gt.double()
    ratio = torch.maximum(p / g, g / p)
    diff = p - g
    d = torch.log(p) - torch.log(g)
    return {
        "abs_rel": (diff.abs() / g).mean(),
        "sq_rel": (diff**2 / g).mean(),
        "rmse": torch.sqrt((diff**2).mean()),
        "rmse_log": torch.sqrt((d**2).mean()),
        "log10": (torch.log10(p) - torch.log10(g)).abs().mean(),
        "silog": 100.0 * torch.sqrt(((d**2).mean() - d.mean() ** 2).clamp_min(0)),
        "delta1": (ratio < 1.25).double().mean(),
        "delta2": (ratio < 1.25**2).double().mean(),
        "delta3": (ratio < 1.25**3).double().mean(),
    }


def image_depth_metrics(
    pred: Tensor,
    gt: Tensor,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    eigen_crop: bool = False,
    align: str = "none",
    max_inclusive: bool = False,
    crop_rounding: str = "floor",
) -> dict[str, Tensor] | None:
    """Metrics of one image: ``pred``, ``gt`` ``(H, W)`` metres. None when no pixel is valid.

    Order: valid mask from ``gt`` -> per-image alignment on the valid pixels -> clamp to the range -> score.
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    mask = valid_depth_mask(gt, min_depth, max_depth, eigen_crop, max_inclusive, crop_rounding)
    if not bool(mask.any()):
        return None
    pred = pred.double()
    gt = gt.double()
    if align == "median":
        pred = align_median(pred, gt, mask)
    elif align == "least_squares":
        pred = align_least_squares(pred, gt, mask)
    pred = torch.nan_to_num(pred, nan=min_depth).clamp(min_depth, max_depth)
    return depth_errors(pred[mask], gt[mask])


class DepthMetrics(Metric):
    """Per-image depth metrics averaged over images, DDP-safe.

    Args:
        min_depth, max_depth: valid ground truth is ``min_depth < gt <= max_depth``; predictions are clamped to it.
        eigen_crop: also restrict to the NYU Eigen crop (scaled to the target size).
        align: "none", "median" (scale) or "least_squares" (scale and shift), per image, before scoring.

    ``update(preds, target)``: preds ``(B, 1, H, W)`` or ``(B, H, W)`` (resized bilinearly to the target size if
    needed), target ``(B, H, W)`` metres with 0 = invalid. ``compute()`` -> ``{name: float}`` for
    :data:`METRIC_NAMES` (NaN when no image had a valid pixel).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(
        self,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        eigen_crop: bool = False,
        align: str = "none",
        max_inclusive: bool = False,
        crop_rounding: str = "floor",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
        if crop_rounding not in CROP_ROUNDING:
            raise ValueError(f"crop_rounding must be one of {CROP_ROUNDING}, got {crop_rounding!r}")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.eigen_crop, self.align = bool(eigen_crop), align
        self.max_inclusive, self.crop_rounding = bool(max_inclusive), crop_rounding
        for name in METRIC_NAMES:
            self.add_state(f"sum_{name}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if target.dim() == 4:
            target = target[:, 0]
        if preds.dim() == 3:
            preds = preds[:, None]
        if preds.shape[-2:] != target.shape[-2:]:
            preds = F.interpolate(preds.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        preds = preds[:, 0].detach()
        target = target.detach()
        for p, g in zip(preds, target):
            values = image_depth_metrics(p, g, self.min_depth, self.max_depth, self.eigen_crop, self.align,
                                         self.max_inclusive, self.crop_rounding)
            if values is None:
                continue
            for name, v in values.items():
                state = getattr(self, f"sum_{name}")
                setattr(self, f"sum_{name}", state + v.to(state.device))
            self.count += 1

    def compute(self) -> dict[str, float]:
        n = int(self.count)
        if n == 0:
            return {name: float("nan") for name in METRIC_NAMES}
        return {name: float(getattr(self, f"sum_{name}")) / n for name in METRIC_NAMES}
