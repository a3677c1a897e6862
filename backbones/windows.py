"""Windowed feature extraction of Meta's DINOv3 detector: an ``n x n`` grid of windows plus a resized global view.

The image is cut into ``n x n`` windows whose sides are multiples of the patch size (the last row / column takes
the rest), each window runs through the backbone and the window maps are put back side by side; the whole image,
resized (bilinear, antialiased) to the size of one window, runs through the backbone too and its maps are resized
to the full map. Meta's ``WindowsWrapper`` (dinov3/eval/detection/models/windows.py) computes the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def window_sides(size: int, n: int, patch: int) -> list[int]:
    """Sides of ``n`` windows along an axis of ``size`` pixels: ``ceil((size // n) / patch) * patch`` each, the last
    one the rest. Raises ``ValueError`` when the image is too small for ``n`` windows of at least one patch."""
    side = math.ceil((size // n) / patch) * patch
    sides = [side] * (n - 1) + [size - side * (n - 1)]
    if min(sides) < patch:
        raise ValueError(f"an image side of {size} px is too small for {n} windows of whole {patch}-px patches "
                         f"(sides {sides}); use larger images or fewer windows (backbone.windows)")
    return sides


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def windowed_maps(extract: Callable[[Tensor], list[Tensor]], images: Tensor, n: int, patch: int) -> list[Tensor]:
    """Feature maps of ``images (B, 3, H, W)`` (sides multiples of ``patch``) seen through ``n x n`` windows.

    Args:
        extract: images -> one ``(B, C_i, h, w)`` map per layer.

    Returns:
        ``2 L`` maps ``(B, C_i, H / patch, W / patch)``: the ``L`` layers of the resized global view, then the ``L``
        layers of the windows.
    """
    H, W = images.shape[-2:]
    hs, ws = window_sides(H, n, patch), window_sides(W, n, patch)
    rows, top = [], 0
    for wh in hs:
        row, left = [], 0
        for ww in ws:
            row.append(extract(images[..., top:top + wh, left:left + ww]))
            left += ww
        rows.append([torch.cat([cell[i] for cell in row], -1) for i in range(len(row[0]))])
        top += wh
    local = [torch.cat([row[i] for row in rows], -2) for i in range(len(rows[0]))]
    view = extract(_resize(images, (hs[0], ws[0])))
    return [_resize(m, tuple(x.shape[-2:])) for m, x in zip(view, local)] + local
