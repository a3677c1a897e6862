"""Depth losses: scale-invariant log loss (SiLog) and multi-scale gradient matching.

Both take ``pred`` and ``gt`` of shape ``(B, H, W)`` in metres and a boolean ``mask`` ``(B, H, W)`` of valid
pixels. Pixels outside the mask never enter a log, so garbage there (0, negative, inf) cannot produce NaN.
A batch without any valid pixel gives ``0 * pred.sum()``: a finite zero that still reaches every parameter
that produced ``pred`` (no DDP hang, no NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _zero_like_graph(pred: Tensor) -> Tensor:
    """A scalar zero connected to ``pred``'s graph."""
    return pred.sum() * 0.0


class SiLogLoss(nn.Module):
    """Scale-invariant log loss in Meta's (dinov3 depth eval) formulation.

    With ``g = log(pred + eps) - log(gt + eps)`` over the valid pixels of the whole batch::

        loss = sqrt(Var(g) + lambda * Mean(g)^2)

    where ``Var`` is the population variance (divide by N). This equals the common (Eigen et al., BTS) form
    ``sqrt(Mean(g^2) - (1 - lambda) * Mean(g)^2)``, so ``lambda=0.15`` here is BTS's 0.85 without its x10 factor.
    ``lambda=0`` is fully scale-invariant; ``lambda=1`` is the RMSE of log depth.
    """

    def __init__(self, lambda_: float = 0.15, eps: float = 1e-3):
        super().__init__()
        self.lambda_ = float(lambda_)
        self.eps = float(eps)

    def forward(self, pred: Tensor, gt: Tensor, mask: Tensor) -> Tensor:
        """pred, gt: ``(B, H, W)`` metres; mask: ``(B, H, W)`` bool -> scalar."""
        if not bool(mask.any()):
            return _zero_like_graph(pred)
        g = torch.log(pred[mask].clamp_min(0) + self.eps) - torch.log(gt[mask] + self.eps)
        mean = g.mean()
        var = ((g - mean) ** 2).mean()
        # clamp: sqrt'(0) is infinite; a perfect fit gets zero gradient instead of NaN.
        return torch.sqrt((var + self.lambda_ * mean**2).clamp_min(1e-12))


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
