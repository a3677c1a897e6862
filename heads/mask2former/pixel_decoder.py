"""Mask2Former pixel decoder: a deformable-attention encoder over the coarse levels + an FPN step.

Input: pyramid levels finest first, strides 4/8/16/32. The ``num_encoder_levels`` coarsest (1/8, 1/16,
1/32) are flattened together and refined by ``enc_layers`` MSDeformAttn encoder layers (Deformable
DETR, post-norm); the finer levels (1/4) are then built top-down FPN style:
``relu(gn(conv3x3(lateral(x) + up(coarser))))``. A 1x1 conv on the finest map gives the per-pixel
embeddings ``mask_features``.

Two input layouts:

- ``in_channels=None`` (default): every level is already ``hidden_dim`` wide (``SimpleFeaturePyramid``
  projects them); the encoder reads the levels as they are.
- ``in_channels=[C_1/4, C_1/8, C_1/16, C_1/32]`` (Meta's layout): the decoder owns the projections of the
  encoder levels (``input_convs``: 1x1 conv + GroupNorm each) and the stride-4 level enters its lateral
  conv unprojected (a 1x1 conv from ``C_1/4`` straight to ``hidden_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import MSDeformAttn
from ..ops.pyramid import group_norm


def sine_position_embedding(
    batch: int, height: int, width: int, dim: int, device=None, dtype=torch.float32, temperature: float = 10000.0
) -> Tensor:
    """DETR sine position encoding (normalised coordinates, scale 2*pi), ``(B, dim, h, w)``.

    The first ``dim / 2`` channels encode ``y``, the rest ``x``; within each half sine and cosine alternate.
    """
    if dim % 2 != 0:
        raise ValueError(f"dim must be even, got {dim}")
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps) * scale
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(npf, device=device, dtype=torch.float32) // 2) / npf)
    pos_y = y[:, None] / dim_t  # (h, npf)
    pos_x = x[:, None] / dim_t  # (w, npf)
    pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], dim=2).flatten(1)
    pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat([pos_y[:, None, :].expand(height, width, npf), pos_x[None, :, :].expand(height, width, npf)], -1)
    return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).to(dtype)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: ``x = norm(x + MSDeformAttn(x + pos))``, ``x = norm(x + FFN(x))``."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, dim_feedforward: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """``src``, ``pos``: ``(B, S, C)``; ``reference_points``: ``(B, S, L, 2)`` -> ``(B, S, C)``."""
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]], batch: int, device=None) -> Tensor:
    """Pixel centres of every level, normalised ``(x, y)``, repeated for each level: ``(B, S, L, 2)``."""
    refs = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack([ref_x.flatten(), ref_y.flatten()], -1))
    ref = torch.cat(refs, 0)  # (S, 2)
    return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder.

    Args:
        hidden_dim: width ``D`` of the input levels and of every output.
        num_heads, num_points, dim_feedforward: MSDeformAttn encoder layer sizes.
        enc_layers: number of encoder layers.
        num_encoder_levels: how many of the coarsest levels the encoder sees (3).
        num_levels: total input levels (4); the ``num_levels - num_encoder_levels`` finest go through the FPN.
        mask_dim: channels of ``mask_features`` (default ``hidden_dim``).
        in_channels: widths of the input levels, finest first, when they are not ``hidden_dim`` wide
            (Meta's layout, see the module docstring); ``None``: all ``hidden_dim``.

    ``forward(levels)``: list of ``(B, D, h_l, w_l)`` finest first ->
    ``(mask_features (B, mask_dim, h_0, w_0), multi_scale [(B, D, h, w)] coarsest first)``, where
    ``multi_scale`` holds the ``num_encoder_levels`` encoder outputs (1/32, 1/16, 1/8).
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        num_heads: int = 8,
        enc_layers: int = 6,
        dim_feedforward: int = 1024,
        num_points: int = 4,
        num_encoder_levels: int = 3,
        num_levels: int = 4,
        mask_dim: int | None = None,
        dropout: float = 0.0,
        in_channels: Sequence[int] | None = None,
    ):
        super().__init__()
        if not 0 < num_encoder_levels <= num_levels:
            raise ValueError("need 0 < num_encoder_levels <= num_levels")
        if in_channels is not None and len(in_channels) != num_levels:
            raise ValueError(f"in_channels {list(in_channels)} must give one width per level ({num_levels})")
        self.num_encoder_levels = num_encoder_levels
        self.num_levels = num_levels
        self.hidden_dim = hidden_dim
        self.level_embed = nn.Parameter(torch.empty(num_encoder_levels, hidden_dim))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(hidden_dim, num_heads, num_encoder_levels, num_points, dim_feedforward, dropout)
            for _ in range(enc_layers)
        )
        n_fpn = num_levels - num_encoder_levels
        widths = list(in_channels) if in_channels is not None else [hidden_dim] * num_levels
        if in_channels is not None:
            self.input_convs = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, hidden_dim, 1), group_norm(hidden_dim)) for c in widths[::-1][:num_encoder_levels]
            )
            for proj in self.input_convs:
                nn.init.xavier_uniform_(proj[0].weight)
                nn.init.zeros_(proj[0].bias)
        else:
            self.input_convs = None
        self.lateral_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), group_norm(hidden_dim)) for c in widths[::-1][num_encoder_levels:]
        )
        self.output_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False), group_norm(hidden_dim), nn.ReLU())
            for _ in range(n_fpn)
        )
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim or hidden_dim, 1)

    def forward(self, levels: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(levels)}")
        # encoder levels, coarsest first (1/32, 1/16, 1/8)
        enc_in = list(levels[::-1][: self.num_encoder_levels])
        if self.input_convs is not None:
            enc_in = [proj(x) for proj, x in zip(self.input_convs, enc_in)]
        b = enc_in[0].shape[0]
        shapes = [(x.shape[-2], x.shape[-1]) for x in enc_in]
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in enc_in], 1)  # (B, S, D)
        pos = torch.cat(
            [
                sine_position_embedding(b, h, w, self.hidden_dim, src.device, src.dtype).flatten(2).transpose(1, 2)
                + self.level_embed[i].to(src.dtype)
                for i, (h, w) in enumerate(shapes)
            ],
            1,
        )
        ref = encoder_reference_points(shapes, b, src.device).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes)
        outs = [
            y.transpose(1, 2).reshape(b, self.hidden_dim, h, w)
            for y, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)
        ]
        multi_scale = list(outs)
        # FPN on the finer levels, coarse to fine
        y = outs[-1]
        fpn_in = list(levels[::-1][self.num_encoder_levels :])
        for x, lateral, output in zip(fpn_in, self.lateral_convs, self.output_convs):
            y = output(lateral(x) + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_features(y), multi_scale
