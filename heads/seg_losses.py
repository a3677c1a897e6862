"""Per-pixel segmentation losses: cross-entropy and smp's Dice, Focal, Lovasz, Tversky and Jaccard, weighted and summed.

``SegLoss(loss=["ce", "lovasz"], loss_weights=[1.0, 0.5])(logits, mask)`` returns ``{"loss_ce": 1.0 * ce,
"loss_lovasz": 0.5 * lovasz}``: already-weighted terms whose sum is the total (the head seam). Every term skips
pixels labelled ``ignore_index`` (255). The region losses are segmentation_models_pytorch's own modules in
``multiclass`` mode; cross-entropy is ``F.cross_entropy`` with a choice of average:

- ``avg_non_ignore=True`` (ours, the default): the mean over labelled pixels.
- ``avg_non_ignore=False`` (Meta's linear-seg recipe, mmseg's default): the sum over labelled pixels divided by
  *all* pixels of the mask, ignored ones included, so images with many ignored pixels weigh less.

Cross-entropy alone on logits smaller than the mask runs fused with the bilinear upsampling
(``heads.ops.upsampled_ce.upsampled_cross_entropy``: the same value and gradient, up to float rounding, without
the full-resolution logits in memory). ``points=N`` (not the default of any recipe) replaces it by an unbiased
estimate from N labelled pixels per image (``sampled_cross_entropy``): the same expected loss and gradient,
``B * K * N`` work instead of ``B * K * H * W``, plus sampling noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from .ops.upsampled_ce import sampled_cross_entropy, upsampled_cross_entropy

IGNORE_INDEX = 255


def _smp_loss(cls, **defaults):
    def build(ignore_index: int, **options) -> nn.Module:
        return cls(mode="multiclass", ignore_index=ignore_index, **{**defaults, **options})
    return build


SMP_LOSSES = {  # name -> builder(ignore_index, **options); options go to the smp class
    "dice": _smp_loss(smp_losses.DiceLoss),
    "focal": _smp_loss(smp_losses.FocalLoss),
    "lovasz": _smp_loss(smp_losses.LovaszLoss),
    "tversky": _smp_loss(smp_losses.TverskyLoss),
    "jaccard": _smp_loss(smp_losses.JaccardLoss),
}
LOSS_NAMES = ("ce", *SMP_LOSSES)


class CrossEntropy(nn.Module):
    """Cross-entropy over labelled pixels, averaged over labelled pixels or (Meta) over all pixels.

    ``forward(logits (B, K, H, W), mask (B, H, W))`` -> scalar. Labels other than ``0..K-1`` and ``ignore_index``
    raise (``F.cross_entropy`` checks them).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, avg_non_ignore: bool = True):
        super().__init__()
        self.ignore_index, self.avg_non_ignore = ignore_index, avg_non_ignore

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits, mask, ignore_index=self.ignore_index, reduction="sum")
        count = (mask != self.ignore_index).sum() if self.avg_non_ignore else mask.numel()
        return total / count


def _as_list(value, what: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise ValueError(f"{what} must be a name or a list of names, got {value!r}")


class SegLoss(nn.Module):
    """A weighted sum of per-pixel losses on class logits.

    Args:
        loss: a name or a list of names from ``LOSS_NAMES`` (``ce``, ``dice``, ``focal``, ``lovasz``, ``tversky``,
            ``jaccard``); or a dict ``{name: weight}``.
        loss_weights: one weight per name (list, same order) or ``{name: weight}`` with exactly the names of
            ``loss``; default 1.0 each.
        ignore_index: label of unlabelled pixels, skipped by every term.
        avg_non_ignore: cross-entropy average over labelled pixels (True) or over all pixels (False, Meta).
        loss_options: per-name keyword arguments of the smp classes, e.g. ``{"focal": {"gamma": 3.0}}``.
        points: 0 (default): every pixel. N > 0 (``loss`` must be ``ce`` alone): cross-entropy estimated from N
            labelled pixels drawn per image, an unbiased estimate of the full loss (see the module docstring).

    ``forward(logits (B, K, h, w), mask (B, H, W))``: logits are resized (bilinear) to the mask size first;
    returns ``{"loss_<name>": weight * value}``. A batch without labelled pixels gives zeros (with gradients).
    """

    def __init__(self, loss: str | Sequence[str] | Mapping[str, float] = "ce",
                 loss_weights: Sequence[float] | Mapping[str, float] | None = None, ignore_index: int = IGNORE_INDEX,
                 avg_non_ignore: bool = True, loss_options: Mapping[str, Mapping] | None = None,
                 points: int = 0):
        super().__init__()
        if isinstance(loss, Mapping):
            if loss_weights is not None:
                raise ValueError("give the weights either in loss={name: weight} or in loss_weights, not both")
            names, loss_weights = list(loss), dict(loss)
        else:
            names = _as_list(loss, "loss")
        unknown = [n for n in names if n not in LOSS_NAMES]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"loss={names}: expected distinct names from {list(LOSS_NAMES)}")
        if loss_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(loss_weights, Mapping):
            if set(loss_weights) != set(names):
                raise ValueError(f"loss_weights keys {sorted(loss_weights)} must be the loss names {names}")
            weights = [float(loss_weights[n]) for n in names]
        else:
            weights = [float(w) for w in _as_list(loss_weights, "loss_weights")]
            if len(weights) != len(names):
                raise ValueError(f"loss_weights={weights} must give one weight per loss in {names}")
        options = dict(loss_options or {})
        if set(options) - set(names):
            raise ValueError(f"loss_options for {sorted(set(options) - set(names))}, which are not in loss={names}")
        if "ce" in options:
            raise ValueError("cross-entropy takes no loss_options (use avg_non_ignore)")
        if points < 0 or (points and names != ["ce"]):
            raise ValueError(f"points={points}: must be >= 0, and > 0 only with loss=ce alone (got loss={names})")
        self.names, self.weights, self.ignore_index = names, weights, ignore_index
        self.avg_non_ignore, self.points = avg_non_ignore, int(points)
        self.terms = nn.ModuleDict({
            n: CrossEntropy(ignore_index, avg_non_ignore) if n == "ce" else SMP_LOSSES[n](ignore_index, **options.get(n, {}))
            for n in names})

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if not (mask != self.ignore_index).any():
            zero = logits.float().sum() * 0.0
            return {f"loss_{n}": zero for n in self.names}
        if self.points:
            ce = sampled_cross_entropy(logits, mask, self.points, self.ignore_index, self.avg_non_ignore)
            return {"loss_ce": self.weights[0] * ce}
        if self.names == ["ce"] and logits.shape[-2:] != mask.shape[-2:]:
            ce = upsampled_cross_entropy(logits, mask, self.ignore_index, self.avg_non_ignore)
            return {"loss_ce": self.weights[0] * ce}
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits, mask.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits.float()
        return {f"loss_{n}": w * self.terms[n](logits, mask) for n, w in zip(self.names, self.weights)}
