"""Adaptive average pooling that keeps its bins when exported with dynamic sizes.

``nn.AdaptiveAvgPool2d(n)`` with ``n > 1`` (UPerNet's pyramid pooling: 2, 3, 6) exports to ONNX as a plain
average pool whose kernel is fixed by the example input, so other input sizes get wrong bins. This module computes
the same bins as PyTorch, rows ``floor(i * H / n) .. ceil((i + 1) * H / n) - 1`` (and likewise columns), as
averaging matrices built from the input size; it has no parameters, so swapping it in changes no state dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def bin_average(size: int, n: int, like: Tensor) -> Tensor:
    """``(n, size)`` matrix whose row ``i`` averages positions ``floor(i * size / n) .. ceil((i + 1) * size / n) - 1``."""
    pos = torch.arange(size, device=like.device)
    idx = torch.arange(n, device=like.device)
    start, end = (idx * size) // n, ((idx + 1) * size + n - 1) // n
    inside = ((pos[None] >= start[:, None]) & (pos[None] < end[:, None])).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


class BinAdaptiveAvgPool2d(nn.Module):
    """``(B, C, H, W)`` -> ``(B, C, n_h, n_w)``: the mean of each adaptive-pooling bin, as two averaging matrices."""

    def __init__(self, output_size: int | tuple[int, int]):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, x: Tensor) -> Tensor:
        rows = bin_average(x.shape[-2], self.output_size[0], x)
        cols = bin_average(x.shape[-1], self.output_size[1], x)
        return torch.einsum("ih,bchw,jw->bcij", rows, x, cols)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


def export_safe_pooling(module: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.AdaptiveAvgPool2d`` of ``module`` with more than one bin by ``BinAdaptiveAvgPool2d``."""
    for name, child in module.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d):
            size = child.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            if None not in size and size != (1, 1):
                setattr(module, name, BinAdaptiveAvgPool2d(size))
        else:
            export_safe_pooling(child)
    return module
