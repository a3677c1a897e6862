"""Plain-DETR's global decoder: pre-norm layers whose cross-attention over the whole feature map is biased by the
position of each cell relative to the query's box (box-relative position bias, decomposed in x and y).

Each layer refines the boxes (re-parameterised deltas, :mod:`.box_reparam`); with look-forward-twice the boxes
of layer ``l`` are predicted from the previous layer's boxes without detaching them, so the previous layer's box
head also learns from layer ``l``'s loss (DINO).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from .box_reparam import apply_deltas


def _bias_mlp(hidden_dim: int, num_heads: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, num_heads, bias=False))


class BoxRPECrossAttention(nn.Module):
    """Multi-head cross-attention from queries to all ``h x w`` cells, plus a per-head bias from the signed
    distances of each cell centre to the query box's sides: ``b(q, y, x) = mlp_x(x - (x0, x1)) + mlp_y(y - (y0, y1))``.

    In a padded batch, padded cells get a further bias of ``-100`` (Meta's / Plain-DETR's soft key mask).

    Args:
        dim: width ``D``; num_heads: heads; rpe_hidden_dim: hidden width of the two bias MLPs;
        feature_stride: input pixels per feature cell (cell ``i`` is centred at ``(i + 0.5) * stride``).
    """

    padding_bias = -100.0

    def __init__(self, dim: int, num_heads: int, rpe_hidden_dim: int = 512, feature_stride: int = 16):
        super().__init__()
        self.num_heads = num_heads
        self.feature_stride = feature_stride
        self.cpb_mlp1 = _bias_mlp(rpe_hidden_dim, num_heads)  # x
        self.cpb_mlp2 = _bias_mlp(rpe_hidden_dim, num_heads)  # y
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self, boxes: Tensor, shape: tuple[int, int]) -> Tensor:
        """``boxes (B, Q, 4)`` xyxy pixels -> bias ``(B, heads, Q, h * w)``."""
        h, w = shape
        s = self.feature_stride
        xs = (torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5) * s
        ys = (torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5) * s
        dx = boxes[:, :, None, 0::2] - xs[:, None]  # (B, Q, w, 2)
        dy = boxes[:, :, None, 1::2] - ys[:, None]  # (B, Q, h, 2)
        bias = self.cpb_mlp2(dy)[:, :, :, None] + self.cpb_mlp1(dx)[:, :, None]  # (B, Q, h, w, heads)
        return bias.flatten(2, 3).permute(0, 3, 1, 2)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        return x.reshape(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, boxes: Tensor, key: Tensor, value: Tensor, shape: tuple[int, int],
                padding_mask: Tensor | None = None) -> Tensor:
        """``query (B, Q, D)``, ``boxes (B, Q, 4)`` xyxy pixels, ``key`` / ``value (B, h*w, D)``, ``padding_mask
        (B, h*w)`` bool (``True``: a padded cell) -> ``(B, Q, D)``."""
        bias = self.position_bias(boxes, shape).contiguous()
        if padding_mask is not None:
            bias = bias + padding_mask[:, None, None].float() * self.padding_bias
        out = F.scaled_dot_product_attention(self._heads(self.q(query)), self._heads(self.k(key)),
                                             self._heads(self.v(value)), attn_mask=bias)
        return self.proj(out.transpose(1, 2).flatten(2))


class RPEDecoderLayer(nn.Module):
    """Pre-norm: self-attention, box-RPE cross-attention, ReLU FFN, each as ``x + f(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int = 2048, rpe_hidden_dim: int = 512,
                 feature_stride: int = 16, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = BoxRPECrossAttention(dim, num_heads, rpe_hidden_dim, feature_stride)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)  # before cross-attention
        self.norm2 = nn.LayerNorm(dim)  # before self-attention
        self.norm3 = nn.LayerNorm(dim)  # before the FFN
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, boxes: Tensor, memory: Tensor, memory_pos: Tensor,
                shape: tuple[int, int], self_attn_mask: Tensor | None = None,
                padding_mask: Tensor | None = None) -> Tensor:
        """``tgt`` / ``query_pos (B, Q, D)``, ``boxes (B, Q, 4)`` xyxy pixels, ``memory`` / ``memory_pos (B, S, D)``;
        ``self_attn_mask (Q, Q)`` bool, True = blocked; ``padding_mask (B, S)`` bool, True = a padded cell."""
        x = self.norm2(tgt)
        q = x + query_pos
        tgt = tgt + self.dropout(self.self_attn(q, q, x, attn_mask=self_attn_mask, need_weights=False)[0])
        x = self.norm1(tgt)
        tgt = tgt + self.dropout(self.cross_attn(x + query_pos, boxes, memory + memory_pos, memory, shape,
                                                 padding_mask))
        x = self.norm3(tgt)
        return tgt + self.dropout(self.linear2(self.dropout(self.linear1(x).relu())))


class RPEDecoder(nn.Module):
    """Decoder layers with a shared final LayerNorm, iterative box refinement and look-forward-twice.

    Args:
        num_layers / dim / num_heads / ffn_dim / rpe_hidden_dim / feature_stride / dropout: of the layers.
        look_forward_twice: layer ``l``'s boxes are refined from layer ``l - 1``'s boxes with their gradient.
    """

    def __init__(self, num_layers: int, dim: int, num_heads: int, ffn_dim: int = 2048, rpe_hidden_dim: int = 512,
                 feature_stride: int = 16, dropout: float = 0.0, look_forward_twice: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(
            RPEDecoderLayer(dim, num_heads, ffn_dim, rpe_hidden_dim, feature_stride, dropout) for _ in range(num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(dim)
        self.look_forward_twice = look_forward_twice

    def forward(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: Tensor, memory_pos: Tensor,
                shape: tuple[int, int], image_size: tuple[float, float] | Tensor, box_heads: Sequence[nn.Module],
                self_attn_mask: Tensor | None = None, padding_mask: Tensor | None = None
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Run all layers.

        Args:
            tgt / query_pos: ``(B, Q, D)`` content queries and their position embedding.
            reference: ``(B, Q, 4)`` initial boxes, cxcywh pixels (detached).
            memory / memory_pos: ``(B, h*w, D)`` encoder output and its position embedding.
            shape: ``(h, w)`` of the memory map; image_size: ``(H, W)`` the boxes are clipped to, or per-image
                ``(W, H, W, H)`` limits ``(B, 1, 4)`` (a padded batch, see :func:`.box_reparam.apply_deltas`).
            box_heads: one delta head per layer.
            self_attn_mask: ``(Q, Q)`` bool, True = blocked; padding_mask: ``(B, h*w)`` bool, True = a padded cell.

        Returns:
            per layer: ``hidden (B, Q, D)`` (after the final norm), ``boxes (B, Q, 4)`` cxcywh pixels, the
            ``references`` they were predicted from and the ``deltas``.
        """
        hidden, boxes, references, deltas = [], [], [], []
        previous = reference  # the reference the next layer's boxes are predicted from
        for layer, box_head in zip(self.layers, box_heads):
            xyxy = box_convert(reference, "cxcywh", "xyxy")
            tgt = layer(tgt, query_pos, xyxy, memory, memory_pos, shape, self_attn_mask, padding_mask)
            out = self.final_layer_norm(tgt)
            delta = box_head(out)
            new = box_convert(apply_deltas(previous, delta, image_size), "xyxy", "cxcywh")
            hidden.append(out)
            references.append(previous)
            deltas.append(delta)
            boxes.append(new)
            reference = new.detach()
            previous = new if self.look_forward_twice else reference
        return hidden, boxes, references, deltas
