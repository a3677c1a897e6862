"""Depth from bin logits (AdaBins-style classification-regression), shared by the depth heads.

A head predicts ``K`` logits per pixel; each bin ``k`` stands for a depth ``b_k``; the weights ``p_k`` come from
the logits and the depth is ``sum_k p_k * b_k``. Two choices, each a constructor value:

``placement`` (where the ``b_k`` sit in ``[min, max]``)
    ``linspace``:  ``b_k = linspace(min, max, K)`` (both ends are bins; Meta's dinov3 depth heads)
    ``midpoints``: the centres of ``K`` equal bins, ``edges = linspace(min, max, K + 1)``
    ``mixlog``:    Meta's CHMv2 canopy-height bins, a blend from log spacing to linear spacing over
                   ``[min, max / 8]`` (the released CHMv2 head predicts 1/8 of the height; see ``mixlog_depth``)
``spacing`` (``linear`` or ``log``) applies to ``linspace`` and ``midpoints``: log spaces the bins evenly in log depth
(``midpoints`` then takes geometric centres).

``norm`` (how logits become weights)
    ``linear``:  ``w = relu(x) + 0.1``, ``p = w / sum(w)`` (Meta's default)
    ``softmax``: ``p = softmax(x)``
    ``sigmoid``: ``w = sigmoid(x)``, ``p = w / sum(w)``
    ``mixlog``:  Meta's CHMv2 mapping (relu, a small positive shift, normalise; result x 8)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PLACEMENTS = ("linspace", "midpoints", "mixlog")
NORMS = ("linear", "softmax", "sigmoid", "mixlog")
# The released CHMv2 head predicts heights / 8 (its bins span [min, max / 8]); outputs are multiplied back.
MIXLOG_SCALE = 8.0


def bin_centres(num_bins: int, min_depth: float, max_depth: float, spacing: str = "linear",
                placement: str = "midpoints") -> Tensor:
    """The depths ``(num_bins,)`` the bins stand for (float32, computed in float64 except ``linspace``).

    ``linspace`` is computed in float32 as ``torch.linspace`` does it, so it equals Meta's bins bit for bit.
    """
    if spacing not in ("linear", "log"):
        raise ValueError(f"bin_spacing must be 'linear' or 'log', got {spacing!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"bin_placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "linspace":
        if spacing == "linear":
            return torch.linspace(min_depth, max_depth, num_bins)
        low, high = torch.log(torch.tensor(min_depth)), torch.log(torch.tensor(max_depth))
        return torch.exp(torch.linspace(float(low), float(high), num_bins))
    if placement == "mixlog":
        top = max_depth / MIXLOG_SCALE
        linear = torch.linspace(min_depth, top, num_bins)
        log = torch.exp(torch.linspace(float(torch.log(torch.tensor(min_depth))),
                                       float(torch.log(torch.tensor(top))), num_bins))
        t = torch.linspace(1.0, 0.0, num_bins)
        return t * log + (1.0 - t) * linear
    if spacing == "linear":
        edges = torch.linspace(min_depth, max_depth, num_bins + 1, dtype=torch.float64)
        centres = 0.5 * (edges[:-1] + edges[1:])
    else:
        log_edges = torch.linspace(math.log(min_depth), math.log(max_depth), num_bins + 1, dtype=torch.float64)
        centres = torch.exp(0.5 * (log_edges[:-1] + log_edges[1:]))
    return centres.float()


def bin_weights(logits: Tensor, norm: str) -> Tensor:
    """``(B, K, H, W)`` logits -> weights ``(B, K, H, W)`` that sum to 1 over ``K`` (``linear|softmax|sigmoid``)."""
    if norm == "softmax":
        return logits.softmax(dim=1)
    if norm == "linear":
        w = torch.relu(logits) + 0.1
    elif norm == "sigmoid":
        w = torch.sigmoid(logits)
    else:
        raise ValueError(f"bin_norm must be one of {NORMS}, got {norm!r}")
    return w / w.sum(dim=1, keepdim=True)


def mixlog_depth(logits: Tensor, centres: Tensor, max_shift: float = 1e-4, eps_shift: float = 1e-8,
                 eps: float = 1e-12) -> Tensor:
    """Meta's CHMv2 read-out: ``relu(x)`` shifted to be strictly positive, normalised, mixed, times 8."""
    y = torch.relu(logits)
    shift = (-y.amin(dim=1, keepdim=True)).clamp(0.0, max_shift) + eps_shift
    y = y + shift
    total = torch.nan_to_num(y.sum(dim=1, keepdim=True), nan=1.0, posinf=1.0, neginf=1.0).clamp_min(eps)
    depth = (y / total * centres.clamp_min(eps)[None, :, None, None]).sum(dim=1, keepdim=True)
    return depth.clamp_min(eps) * MIXLOG_SCALE


class BinsToDepth(nn.Module):
    """``(B, K, H, W)`` bin logits -> ``(B, 1, H, W)`` depth, in float32 at least (also under bf16 autocast).

    Args:
        num_bins, min_depth, max_depth: the bins; spacing, placement, norm: see the module docstring.
    """

    def __init__(self, num_bins: int, min_depth: float, max_depth: float, spacing: str = "linear",
                 placement: str = "linspace", norm: str = "linear"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"bin_norm must be one of {NORMS}, got {norm!r}")
        if (norm == "mixlog") != (placement == "mixlog"):
            raise ValueError(f"bin_norm 'mixlog' and bin_placement 'mixlog' go together, got {norm!r} / {placement!r}")
        self.norm = norm
        self.register_buffer("centres", bin_centres(num_bins, min_depth, max_depth, spacing, placement),
                             persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # no bf16 mixture: it would round depths
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, centres = logits.to(dtype), self.centres.to(dtype)
            if self.norm == "mixlog":
                return mixlog_depth(logits, centres)
            return torch.einsum("bkhw,k->bhw", bin_weights(logits, self.norm), centres).unsqueeze(1)
