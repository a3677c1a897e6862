"""Sine position encodings of Plain-DETR: of a feature map's cells and of query boxes."""

from __future__ import annotations

import torch
from torch import Tensor

from .transformer import sine_embed


def sine_position_map(height: int, width: int, dim: int, device=None, eps: float = 1e-6) -> Tensor:
    """DETR's normalised sine encoding of an unpadded ``(height, width)`` map.

    Cell ``(i, j)`` is encoded at ``((i + 0.5) / height, (j + 0.5) / width)`` (up to ``eps``), ``dim / 2``
    features for y then ``dim / 2`` for x.

    Returns:
        ``(height * width, dim)``, cells in row-major order.
    """
    y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / (height + eps)
    x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / (width + eps)
    grid = torch.stack(torch.meshgrid(y, x, indexing="ij"), -1).reshape(-1, 2)  # (h*w, 2) as (y, x)
    return sine_embed(grid, dim // 2)


def box_position(boxes: Tensor, dim: int) -> Tensor:
    """Sine encoding of ``(..., 4)`` boxes (any unit; Plain-DETR feeds cxcywh pixels), ``dim // 4`` per coordinate.

    Returns:
        ``(..., dim)``.
    """
    return sine_embed(boxes, dim // 4)
