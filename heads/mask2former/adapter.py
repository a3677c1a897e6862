"""ViT-Adapter (Chen et al., ICLR 2023), the extractor-only variant of Meta's DINOv3 segmentor.

A plain ViT gives maps at one stride (16). The adapter turns four of its layers plus the input image
into a pyramid at strides 4/8/16/32, all ``D`` (the ViT width) wide:

1. ``SpatialPrior``: a small conv stem on the normalized image gives ``c1..c4`` at strides 4/8/16/32,
   each lifted to ``D`` by a 1x1 conv.
2. ``c2, c3, c4`` (plus a learned level embedding) are flattened into one query sequence. For each ViT
   layer in turn, an ``Extractor`` lets the queries read that layer's tokens by multi-scale deformable
   attention (one value level, values ``value_ratio * D`` wide) and refines them with a ``ConvFFN``
   whose depth-wise 3x3 conv runs on every level in its own 2-D layout. The last layer has
   ``extra_extractors`` more extractors. The ViT is only read (no injectors), so it can stay frozen.
3. ``c1 += ConvTranspose2x2(c2)``; ViT layer ``i``, bilinearly resized to level ``i`` (1/4, 1/8, 1/16,
   1/32), is added to it; every level goes through its own BatchNorm.

Sides that are multiples of 32 give exactly Meta's level sizes; other multiples of the patch size also
work here (the coarse levels round up as the strided convolutions do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops import MSDeformAttn
from .pixel_decoder import encoder_reference_points

Shape = tuple[int, int]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class SpatialPrior(nn.Module):
    """Conv stem: image ``(B, 3, H, W)`` -> ``[c1, c2, c3, c4]``, ``(B, D, H / s, W / s)`` for ``s`` = 4, 8, 16, 32.

    ``stem``: three 3x3 conv-BN-ReLU (the first with stride 2) and a stride-2 max pool (stride 4, ``P``
    channels); ``down``: three stride-2 conv-BN-ReLU (``2P``, ``4P``, ``4P`` channels); ``proj``: one 1x1
    conv per level to ``D``.
    """

    def __init__(self, embed_dim: int, inplanes: int = 64):
        super().__init__()
        p = inplanes
        self.stem = nn.Sequential(*_conv_bn_relu(3, p, 2), *_conv_bn_relu(p, p, 1), *_conv_bn_relu(p, p, 1),
                                  nn.MaxPool2d(3, 2, 1))
        self.down = nn.ModuleList(nn.Sequential(*_conv_bn_relu(a, b, 2)) for a, b in ((p, 2 * p), (2 * p, 4 * p), (4 * p, 4 * p)))
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in (p, 2 * p, 4 * p, 4 * p))

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stem(images)
        levels = [x]
        for down in self.down:
            x = down(x)
            levels.append(x)
        return [proj(level) for proj, level in zip(self.proj, levels)]


class ConvFFN(nn.Module):
    """``fc2(drop(gelu(dwconv3x3(fc1(x)))))`` on a sequence of several flattened levels.

    ``forward(x (B, S, D), shapes)``: the depth-wise conv (shared by the levels) runs on each level
    ``(h, w)`` of ``shapes`` separately; ``S = sum(h * w)``.
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, shapes: Sequence[Shape]) -> Tensor:
        x = self.fc1(x)
        b, _, c = x.shape
        parts = x.split([h * w for h, w in shapes], dim=1)
        x = torch.cat([self.dwconv(part.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
                       for part, (h, w) in zip(parts, shapes)], dim=1)
        return self.drop(self.fc2(self.drop(self.act(x))))


class Extractor(nn.Module):
    """Queries read one ViT layer: ``q += attn(norm(q), norm(tokens))``, then ``q += drop_path(ffn(norm(q)))``.

    Args:
        dim: ``D``.
        num_heads, num_points: of the deformable attention (one value level).
        value_ratio: value width as a fraction of ``D``.
        ffn_ratio: ``ConvFFN`` hidden width as a fraction of ``D``.
        drop_path: stochastic-depth rate on the FFN branch.
    """

    def __init__(self, dim: int, num_heads: int = 16, num_points: int = 4, value_ratio: float = 0.5,
                 ffn_ratio: float = 0.25, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=eps)
        self.feat_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = MSDeformAttn(dim, num_heads, num_levels=1, num_points=num_points, value_ratio=value_ratio)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: Tensor, reference_points: Tensor, tokens: Tensor, token_shape: Shape,
                query_shapes: Sequence[Shape]) -> Tensor:
        """``query`` ``(B, S, D)`` with ``reference_points`` ``(B, S, 1, 2)``; ``tokens`` ``(B, h*w, D)`` -> ``(B, S, D)``."""
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(tokens), [token_shape])
        return query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))


class ViTAdapter(nn.Module):
    """ViT layers + image -> 4-level pyramid (see the module docstring).

    Args:
        embed_dim: ViT width ``D``.
        num_layers: ViT layers read (one interaction block each); 4.
        conv_inplanes: channels ``P`` of the spatial-prior stem.
        num_heads, num_points, value_ratio: deformable attention of the extractors.
        ffn_ratio: ConvFFN width / ``D``.
        drop_path_rate: stochastic depth of every extractor's FFN branch.
        extra_extractors: additional extractors on the last layer.
        add_vit_features: add the resized ViT layers to the levels.
        grad_checkpointing: recompute the extractors in the backward pass (saves memory, same numbers).

    ``forward(images (B, 3, H, W), maps [(B, D, H/p, W/p)] * num_layers)`` -> ``[(B, D, H/s, W/s)]`` for
    ``s`` = 4, 8, 16, 32 (finest first).
    """

    def __init__(self, embed_dim: int, num_layers: int = 4, conv_inplanes: int = 64, num_heads: int = 16,
                 num_points: int = 4, value_ratio: float = 0.5, ffn_ratio: float = 0.25, drop_path_rate: float = 0.3,
                 extra_extractors: int = 2, add_vit_features: bool = True, grad_checkpointing: bool = False):
        super().__init__()
        if num_layers != 4:
            raise ValueError(f"the adapter reads 4 ViT layers (one per pyramid level), got num_layers={num_layers}")
        self.embed_dim = embed_dim
        self.add_vit_features = add_vit_features
        self.grad_checkpointing = grad_checkpointing
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spatial_prior = SpatialPrior(embed_dim, conv_inplanes)
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                Extractor(embed_dim, num_heads, num_points, value_ratio, ffn_ratio, drop_path_rate)
                for _ in range(1 + (extra_extractors if i == num_layers - 1 else 0))
            )
            for i in range(num_layers)
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(embed_dim) for _ in range(4))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear: truncated normal (0.02); convs: He normal on fan-out; deformable attention: its own init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, images: Tensor, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != len(self.blocks):
            raise ValueError(f"the adapter reads {len(self.blocks)} ViT layers, got {len(maps)} maps")
        c1, c2, c3, c4 = self.spatial_prior(images)
        b, d = c1.shape[:2]
        shapes = [(c.shape[-2], c.shape[-1]) for c in (c2, c3, c4)]
        query = torch.cat([c.flatten(2).transpose(1, 2) + self.level_embed[i] for i, c in enumerate((c2, c3, c4))], 1)
        reference_points = encoder_reference_points(shapes, b, query.device)[:, :, :1].to(query.dtype)
        for block, x in zip(self.blocks, maps):
            tokens = x.flatten(2).transpose(1, 2).to(query.dtype)
            token_shape = (x.shape[-2], x.shape[-1])
            for extractor in block:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    query = checkpoint(extractor, query, reference_points, tokens, token_shape, shapes, use_reentrant=False)
                else:
                    query = extractor(query, reference_points, tokens, token_shape, shapes)
        c2, c3, c4 = (q.transpose(1, 2).reshape(b, d, h, w) for q, (h, w) in zip(query.split([h * w for h, w in shapes], 1), shapes))
        levels = [c1 + self.up(c2), c2, c3, c4]
        if self.add_vit_features:
            levels = [c + (x if x.shape[-2:] == c.shape[-2:] else
                           F.interpolate(x, size=c.shape[-2:], mode="bilinear", align_corners=False)).to(c.dtype)
                      for c, x in zip(levels, maps)]
        return [norm(c) for norm, c in zip(self.norms, levels)]
