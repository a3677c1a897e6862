"""Deformable-DETR building blocks: multi-scale input, deformable attention, encoder and decoder.

Coordinates: reference points and boxes are normalised to the network input ``image_size`` (``[0, 1]``).
Each level ``l`` of stride ``s_l`` with ``(h_l, w_l)`` cells covers ``(h_l s_l, w_l s_l)`` pixels; its
*valid ratio* ``r_l = (W / (w_l s_l), H / (h_l s_l))`` maps image-normalised coordinates to the level's own
normalised coordinates (``x_level = x_image * r_l``), as Deformable DETR's ``valid_ratios`` do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import MSDeformAttn


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``logit(x)`` with ``x`` clamped to ``[eps, 1 - eps]``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_embed(coords: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine embedding of normalised coordinates.

    Args:
        coords: ``(..., d)`` values in ``[0, 1]``.
        num_feats: features per coordinate (even).

    Returns:
        ``(..., d * num_feats)``.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords[..., None].float() * (2 * math.pi) / dim_t  # (..., d, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos.flatten(-2)


def _norm(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, dim), dim)


class MultiScaleInput(nn.Module):
    """Project backbone maps to ``hidden_dim`` at the level strides of the deformable transformer.

    Maps of equal stride are concatenated (a ViT gives four stride-16 maps) and projected by a 1x1 conv + GroupNorm.
    A level stride that no map has is made from the nearest finer map by stride-2 3x3 convs, or, when it is finer
    than every map, from the finest map by stride-2 transposed convs.

    Args:
        in_channels / strides: of the backbone maps.
        hidden_dim: output channels ``D``.
        level_strides: strides of the output levels (powers of two apart from the inputs).
    """

    def __init__(
        self, in_channels: Sequence[int], strides: Sequence[int], hidden_dim: int, level_strides: Sequence[int]
    ):
        super().__init__()
        self.src_strides = sorted(set(strides))
        self.groups = {s: [i for i, t in enumerate(strides) if t == s] for s in self.src_strides}
        self.proj = nn.ModuleDict(
            {
                str(s): nn.Sequential(nn.Conv2d(sum(in_channels[i] for i in idx), hidden_dim, 1), _norm(hidden_dim))
                for s, idx in self.groups.items()
            }
        )
        self.level_strides = list(level_strides)
        self.sources: list[int] = []
        self.resample = nn.ModuleList()
        for t in self.level_strides:
            finer = [s for s in self.src_strides if s <= t]
            src = max(finer) if finer else self.src_strides[0]
            factor = t / src
            steps = round(math.log2(factor)) if factor >= 1 else round(math.log2(1 / factor))
            if 2**steps != (factor if factor >= 1 else 1 / factor):
                raise ValueError(f"level stride {t} is not a power-of-two multiple of backbone stride {src}")
            layers: list[nn.Module] = []
            for k in range(steps):
                if factor >= 1:
                    layers += [nn.Conv2d(hidden_dim, hidden_dim, 3, stride=2, padding=1), _norm(hidden_dim)]
                else:
                    layers += [nn.ConvTranspose2d(hidden_dim, hidden_dim, 2, stride=2), _norm(hidden_dim)]
                    if k < steps - 1:
                        layers.append(nn.GELU())
            self.sources.append(src)
            self.resample.append(nn.Sequential(*layers))

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """``maps``: backbone ``(B, C_i, h_i, w_i)`` -> one ``(B, D, h_l, w_l)`` per level stride."""
        base = {s: self.proj[str(s)](torch.cat([maps[i] for i in idx], 1)) for s, idx in self.groups.items()}
        return [f(base[s]) for s, f in zip(self.sources, self.resample)]


class FFN(nn.Module):
    """``Linear -> ReLU -> Linear`` with residual and LayerNorm (post-norm)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.net(x))


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN (post-norm)."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes) -> Tensor:
        """``src``/``pos``: ``(B, S, D)``; ``reference``: ``(B, S, L, 2)``."""
        src = self.norm(src + self.drop(self.attn(src + pos, reference, src, shapes)))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    """Self-attention between queries, deformable cross-attention to the memory, FFN (post-norm)."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: Tensor, shapes, attn_mask: Tensor | None
    ) -> Tensor:
        """``tgt``/``query_pos``: ``(B, Q, D)``; ``reference``: ``(B, Q, L, 4)``; ``memory``: ``(B, S, D)``;
        ``attn_mask``: ``(Q, Q)`` bool, True = blocked."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.drop(self.cross_attn(tgt + query_pos, reference, memory, shapes)))
        return self.ffn(tgt)


def level_geometry(
    shapes: Sequence[tuple[int, int]], strides: Sequence[int], image_size: tuple[int, int], device
) -> tuple[Tensor, Tensor]:
    """Token centres and valid ratios of the flattened levels.

    Returns:
        centres: ``(S, 2)`` ``(x, y)`` of every token in image-normalised coordinates (may exceed 1 on padding);
        ratios: ``(L, 2)`` valid ratios ``(r_x, r_y)``.
    """
    H, W = image_size
    centres, ratios = [], []
    for (h, w), s in zip(shapes, strides):
        rx, ry = W / (w * s), H / (h * s)
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
            (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
            indexing="ij",
        )
        centres.append(torch.stack([xs.flatten() / rx, ys.flatten() / ry], -1))
        # scalar_tensor, not torch.tensor: traced sizes stay symbolic (ONNX export with dynamic H, W)
        ratios.append(torch.stack([torch.scalar_tensor(r, dtype=torch.float32, device=device) for r in (rx, ry)]))
    return torch.cat(centres), torch.stack(ratios)


class DeformableEncoder(nn.Module):
    """Stack of :class:`EncoderLayer` over the flattened multi-scale tokens."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, num_heads, num_levels, num_points, ffn_dim) for _ in range(num_layers)
        )

    def forward(self, src: Tensor, pos: Tensor, centres: Tensor, ratios: Tensor, shapes) -> Tensor:
        """``src``/``pos``: ``(B, S, D)``; ``centres``: ``(S, 2)``; ``ratios``: ``(L, 2)`` -> memory ``(B, S, D)``."""
        reference = (centres[:, None, :] * ratios[None]).unsqueeze(0).expand(src.shape[0], -1, -1, -1)
        for layer in self.layers:
            src = layer(src, pos, reference, shapes)
        return src


class DeformableDecoder(nn.Module):
    """Decoder with iterative box refinement.

    Each layer ``i`` embeds its reference boxes ``b_{i-1}`` (sine + MLP) as the query position, attends around them,
    and predicts ``b_i = sigmoid(bbox_embed_i(h_i) + inverse_sigmoid(b_{i-1}))``. With ``box_refine`` the next layer
    uses ``b_i`` (detached) as its reference; without it all layers keep the initial references.

    Args:
        class_embed / bbox_embed: one head per layer (may be the same module repeated when not refining).
    """

    def __init__(
        self,
        num_layers: int,
        dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        ffn_dim: int,
        class_embed: nn.ModuleList,
        bbox_embed: nn.ModuleList,
        box_refine: bool = True,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, num_heads, num_levels, num_points, ffn_dim) for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        self.box_refine = box_refine
        self.dim = dim

    def forward(
        self, tgt: Tensor, reference: Tensor, memory: Tensor, ratios: Tensor, shapes, attn_mask: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Run all layers.

        Args:
            tgt: ``(B, Q, D)`` content queries; reference: ``(B, Q, 4)`` initial boxes cxcywh in ``(0, 1)``.
            memory: ``(B, S, D)``; ratios: ``(L, 2)``; attn_mask: ``(Q, Q)`` bool or None.

        Returns:
            per-layer logits ``(B, Q, K)`` and boxes ``(B, Q, 4)``.
        """
        logits, boxes = [], []
        ref = reference.detach()
        scale = torch.cat([ratios, ratios], -1)[None, None]  # (1, 1, L, 4)
        for i, layer in enumerate(self.layers):
            query_pos = self.ref_point_head(sine_embed(ref, self.dim // 2))
            tgt = layer(tgt, query_pos, ref[:, :, None] * scale, memory, shapes, attn_mask)
            box = (self.bbox_embed[i](tgt) + inverse_sigmoid(ref)).sigmoid()
            logits.append(self.class_embed[i](tgt))
            boxes.append(box)
            if self.box_refine:
                ref = box.detach()
        return logits, boxes
