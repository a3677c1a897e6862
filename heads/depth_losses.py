"""Depth losses: scale-invariant log loss (SiLog) and multi-scale gradient matching.

Both take ``pred`` and ``gt`` of shape ``(B, H, W)`` in metres and a boolean ``mask`` ``(B, H, W)`` of valid
pixels. Pixels outside the mask never enter a log, so garbage there (0, negative, inf) cannot produce NaN.
A batch without any valid pixel gives ``0 * pred.sum()``: a finite zero that still reaches every parameter
that produced ``pred`` (no DDP hang, no NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _zero_like_graph(pred: Tensor) -> Tensor:
    """A scalar zero connected to ``pred``'s graph."""
    return pred.sum() * 0.0


class SiLogLoss(nn.Module):
    """Scale-invariant log loss in Meta's (dinov3 depth eval) formulation.

    With ``g = log(pred + eps) - log(gt + eps)`` over the valid pixels of the whole batch::

        loss = sqrt(Var(g) + lambda * Mean(g)^2)

    ``unbiased=True`` (Meta's ``torch.var``) divides ``Var`` by ``N - 1``; ``False`` by ``N`` (the population
    variance, for which the loss equals the common Eigen et al. / BTS form ``sqrt(Mean(g^2) - (1 - lambda) Mean(g)^2)``,
    so ``lambda=0.15`` here is BTS's 0.85 without its x10 factor). ``lambda=0`` is fully scale-invariant.

    ``warmup_iters``: the first ``warmup_iters`` calls leave the variance out (``loss = sqrt(lambda) |Mean(g)|``),
    as Meta's loss does for its first 100 iterations; the count is kept on the module and counts calls in
    training mode only (validation does not advance it).
    """

    def __init__(self, lambda_: float = 0.15, eps: float = 1e-3, unbiased: bool = False, warmup_iters: int = 0):
        super().__init__()
        self.lambda_ = float(lambda_)
        self.eps = float(eps)
        self.unbiased = bool(unbiased)
        self.warmup_iters = int(warmup_iters)
        self.calls = 0

    def forward(self, pred: Tensor, gt: Tensor, mask: Tensor) -> Tensor:
        """pred, gt: ``(B, H, W)`` metres; mask: ``(B, H, W)`` bool -> scalar."""
        warming = self.calls < self.warmup_iters
        if self.training and warming:
            self.calls += 1
        if not bool(mask.any()):
            return _zero_like_graph(pred)
        g = torch.log(pred[mask].clamp_min(0) + self.eps) - torch.log(gt[mask] + self.eps)
        mean = g.mean()
        value = self.lambda_ * mean**2
        if not warming:
            n = g.numel() - (1 if self.unbiased else 0)
            value = value + ((g - mean) ** 2).sum() / max(n, 1)
        # clamp: sqrt'(0) is infinite; a perfect fit gets zero gradient instead of NaN.
        return torch.sqrt(value.clamp_min(1e-12))


class GradientMatchingLoss(nn.Module):
    """Multi-scale gradient matching on log depth (MiDaS-style, on ``R = log pred - log gt``).

    For scale ``s`` in ``0..scales-1`` the maps are subsampled by ``2**s`` (``x[:, ::2**s, ::2**s]``) and::

        L_s = (sum |R[i, j+1] - R[i, j]| over horizontally adjacent valid pairs
               + sum |R[i+1, j] - R[i, j]| over vertically adjacent valid pairs) / max(#valid pixels at s, 1)

    and the loss is the mean of ``L_s`` over scales. A global scale on ``pred`` leaves it unchanged.
    """

    def __init__(self, scales: int = 4, eps: float = 1e-3):
        super().__init__()
        self.scales = int(scales)
        self.eps = float(eps)

    def forward(self, pred: Tensor, gt: Tensor, mask: Tensor) -> Tensor:
        """pred, gt: ``(B, H, W)`` metres; mask: ``(B, H, W)`` bool -> scalar."""
        if not bool(mask.any()):
            return _zero_like_graph(pred)
        log_pred = torch.log(pred.clamp_min(0) + self.eps)
        log_gt = torch.log(torch.where(mask, gt, torch.ones_like(gt)) + self.eps)
        r = torch.where(mask, log_pred - log_gt, torch.zeros_like(log_pred))
        total = r.new_zeros(())
        for s in range(self.scales):
            step = 2**s
            r_s, m_s = r[:, ::step, ::step], mask[:, ::step, ::step]
            mx = m_s[:, :, 1:] & m_s[:, :, :-1]
            my = m_s[:, 1:, :] & m_s[:, :-1, :]
            gx = (r_s[:, :, 1:] - r_s[:, :, :-1]).abs() * mx
            gy = (r_s[:, 1:, :] - r_s[:, :-1, :]).abs() * my
            total = total + (gx.sum() + gy.sum()) / m_s.sum().clamp_min(1)
        return total / self.scales


class DepthCriterion(nn.Module):
    """The loss of a depth head: SiLog (+ optional gradient matching) over the valid ground-truth pixels.

    ``outputs["depth"]`` ``(B, 1, h, w)`` is resized bilinearly to the target size when they differ; targets
    ``(B, H, W)`` metres, 0 = invalid; pixels outside ``[min_depth, max_depth]`` (or not finite) are ignored.

    Args:
        min_depth, max_depth: valid target range in metres.
        silog_lambda, silog_unbiased, silog_warmup: :class:`SiLogLoss` ``lambda_``, ``unbiased``, ``warmup_iters``.
        grad_weight: weight of :class:`GradientMatchingLoss`; 0 disables it.
    """

    def __init__(self, min_depth: float, max_depth: float, silog_lambda: float = 0.15, silog_unbiased: bool = True,
                 silog_warmup: int = 100, grad_weight: float = 0.0):
        super().__init__()
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.silog = SiLogLoss(silog_lambda, unbiased=silog_unbiased, warmup_iters=silog_warmup)
        self.grad_weight = float(grad_weight)
        self.grad_loss = GradientMatchingLoss() if grad_weight > 0 else None

    def valid_mask(self, gt: Tensor) -> Tensor:
        """``(B, H, W)`` metres -> bool mask of finite depths in ``[min_depth, max_depth]`` (0 is invalid)."""
        return torch.isfinite(gt) & (gt > 0) & (gt >= self.min_depth) & (gt <= self.max_depth)

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Returns ``{"loss_silog": ...}`` plus ``"loss_grad"`` (already multiplied by ``grad_weight``) when enabled."""
        pred = outputs["depth"]
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # losses in >= float32, also under autocast
        gt = targets["depth"].to(pred.dtype)
        if gt.dim() == 4:
            gt = gt[:, 0]
        if pred.shape[-2:] != gt.shape[-2:]:
            pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=False)
        pred = pred[:, 0]
        mask = self.valid_mask(gt)
        gt = torch.where(mask, gt, torch.ones_like(gt))  # keep NaN/inf targets out of every op
        losses = {"loss_silog": self.silog(pred, gt, mask)}
        if self.grad_loss is not None:
            losses["loss_grad"] = self.grad_weight * self.grad_loss(pred, gt, mask)
        return losses
