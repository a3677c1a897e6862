"""Padding masks of Plain-DETR: which cells of a batch padded to one size lie outside each image.

A batch of differently sized images is zero-padded bottom/right to one ``(H, W)``; the pixel mask says which pixels
are padding (``True``, DETR's convention). Every map the detector builds from the batch gets its own mask by
nearest-neighbour resampling of the pixel mask (``F.interpolate``'s ``nearest``: a cell takes the value of the
pixel at ``floor(i * H / h)``, so a cell whose first pixel is inside the image counts as inside), as Meta's detector
does for the backbone maps and for every proposal level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def padding_mask(sizes: Sequence[Sequence[int]], padded_size: Sequence[int], device=None) -> Tensor:
    """The pixel mask of images of ``sizes`` (``(h_i, w_i)`` each) in the top-left corner of a ``padded_size`` batch.

    Returns:
        ``(B, H, W)`` bool, ``True`` on padding.
    """
    H, W = (int(s) for s in padded_size)
    for h, w in sizes:
        if not (0 < h <= H and 0 < w <= W):
            raise ValueError(f"an image of {h}x{w} pixels does not fit a padded batch of {H}x{W}")
    size = torch.as_tensor([[int(h), int(w)] for h, w in sizes], device=device)
    rows = torch.arange(H, device=device)[None, :, None] >= size[:, 0, None, None]
    cols = torch.arange(W, device=device)[None, None, :] >= size[:, 1, None, None]
    return rows | cols


def resize_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """``(B, H, W)`` bool mask -> ``(B, h, w)`` by nearest-neighbour resampling."""
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].bool()
