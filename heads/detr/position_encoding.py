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


def masked_sine_position_map(mask: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    """:func:`sine_position_map` of each image's valid area in a padded batch (DETR's ``PositionEmbeddingSine``).

    A cell's coordinate counts the valid cells up to it along its column (y) or row (x), minus ``0.5``, divided by
    the count over the whole column or row (up to ``eps``): valid cells are encoded relative to the valid extent,
    padded cells repeat the last valid coordinate (or get a large negative one where a column or row has no valid
    cell). An all-valid mask gives :func:`sine_position_map`.

    Args:
        mask: ``(B, h, w)`` bool, ``True`` on padding.

    Returns:
        ``(B, h * w, dim)``.
    """
    valid = ~mask
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    y = (y - 0.5) / (y[:, -1:, :] + eps)
    x = (x - 0.5) / (x[:, :, -1:] + eps)
    return sine_embed(torch.stack([y, x], -1).flatten(1, 2), dim // 2)


def box_position(boxes: Tensor, dim: int) -> Tensor:
    """Sine encoding of ``(..., 4)`` boxes (any unit; Plain-DETR feeds cxcywh pixels), ``dim // 4`` per coordinate.

    Returns:
        ``(..., dim)``.
    """
    return sine_embed(boxes, dim // 4)
