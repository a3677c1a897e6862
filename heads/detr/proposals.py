"""Two-stage proposals of Plain-DETR: the single-scale encoder output is resampled to several strides and every
cell becomes an anchor box in absolute pixels, refined by the encoder's delta head."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .box_reparam import size_tensor
from .padding_mask import resize_mask


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _resampler(dim: int, in_stride: int, out_stride: int) -> nn.Module:
    """Identity, or ``log2`` ratio stride-2 (transposed) convs with LayerNorm + GELU between them."""
    if out_stride == in_stride:
        return nn.Identity()
    ratio = out_stride / in_stride if out_stride > in_stride else in_stride / out_stride
    steps = round(math.log2(ratio))
    if 2**steps != ratio:
        raise ValueError(f"proposal stride {out_stride} is not a power-of-two multiple of the input stride {in_stride}")
    conv = nn.Conv2d if out_stride > in_stride else nn.ConvTranspose2d
    layers: list[nn.Module] = []
    for _ in range(steps - 1):
        layers += [conv(dim, dim, kernel_size=2, stride=2), LayerNorm2d(dim), nn.GELU()]
    layers.append(conv(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class ProposalLevels(nn.Module):
    """Anchor boxes and their features at several strides from a single-scale memory.

    Level ``l`` has stride ``strides[l]`` and anchors of side ``min_size * 2**l`` pixels centred on its cells.
    Anchors not strictly inside ``[0.01, 0.99]`` of the image (on every coordinate) are invalid: their features are
    zeroed and their box set to ``max(H, W)`` so that they are never chosen. In a padded batch the image is each
    image's valid extent (its valid cells at level 0 x the level-0 stride) and padded cells are invalid too.

    Args:
        dim: memory width ``D``; in_stride: stride of the memory map; strides: proposal strides (Meta: 8/16/32/64
        for patch 16); min_size: anchor side at the finest level, pixels.
    """

    def __init__(self, dim: int, in_stride: int, strides: Sequence[int], min_size: float = 50.0):
        super().__init__()
        self.strides = list(strides)
        self.min_size = min_size
        self.enc_output_proj = nn.ModuleList(_resampler(dim, in_stride, s) for s in self.strides)
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)

    def forward(self, memory: Tensor, shape: tuple[int, int], mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor, tuple[int, int] | Tensor]:
        """Proposal features and anchors.

        Args:
            memory: ``(B, h*w, D)`` encoder output of an ``(h, w)`` map at ``in_stride``.
            mask: ``(B, h, w)`` bool, ``True`` on padding (``None``: no padding); resampled to every level
                (:func:`.padding_mask.resize_mask`).

        Returns:
            ``features (B, S, D)``, ``anchors (B, S, 4)`` cxcywh pixels over all ``S`` cells of all levels, and the
            image size the anchors are clipped to: without ``mask`` ``(H, W)`` (level 0's cells x its stride), with
            it each image's valid extent as ``(W, H, W, H)`` limits ``(B, 1, 4)`` (the ``max_size`` of
            :func:`.box_reparam.apply_deltas`).
        """
        B, _, D = memory.shape
        grid = memory.transpose(1, 2).reshape(B, D, *shape)
        feats, anchors, masks, size = [], [], [], None
        for level, (proj, stride) in enumerate(zip(self.enc_output_proj, self.strides)):
            x = proj(grid)
            h, w = x.shape[-2:]
            if size is None:
                size = (h * stride, w * stride)
            ys = (torch.arange(h, dtype=torch.float32, device=x.device) + 0.5) * stride
            xs = (torch.arange(w, dtype=torch.float32, device=x.device) + 0.5) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            side = torch.full_like(cx, self.min_size * 2.0**level)
            anchors.append(torch.stack([cx, cy, side, side], -1).reshape(-1, 4))
            feats.append(x.flatten(2).transpose(1, 2))
            if mask is not None:
                masks.append(resize_mask(mask, (h, w)))
        anchors = torch.cat(anchors)[None].expand(B, -1, -1)
        feats = torch.cat(feats, 1)
        H, W = size
        if mask is None:
            limit = size_tensor((W, H, W, H), anchors)
            valid = ((anchors > 0.01 * limit) & (anchors < 0.99 * limit)).all(-1, keepdim=True)
            anchors = torch.where(valid, anchors, limit.max())
            feats = feats.masked_fill(~valid, 0.0)
            return self.enc_output_norm(self.enc_output(feats)), anchors, size
        first, stride = masks[0], self.strides[0]
        valid_h = (~first[:, :, 0]).sum(1).float() * stride
        valid_w = (~first[:, 0, :]).sum(1).float() * stride
        limit = torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None]  # (B, 1, 4)
        inside = ((anchors > 0.01 * limit) & (anchors < 0.99 * limit)).all(-1, keepdim=True)
        invalid = torch.cat([m.flatten(1) for m in masks], 1)[..., None] | ~inside
        anchors = anchors.masked_fill(invalid, float(max(H, W)))
        feats = feats.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(feats)), anchors, limit
