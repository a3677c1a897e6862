"""Mask2Former transformer decoder with masked attention (Cheng et al. 2022).

Learnable queries (content ``query_feat`` + positional ``query_embed``) go through ``num_layers``
layers of masked cross-attention -> self-attention -> FFN (post-norm). Layer ``i`` attends to the
multi-scale level ``i % num_feature_levels`` (coarsest first), whose tokens carry a sine position
encoding and a learned level embedding. Before the first layer and after every layer a shared
prediction head gives class logits and mask logits; the mask logits, resized to the *next* level's
resolution, become that layer's attention mask: a query only sees pixels where
``sigmoid(mask) >= 0.5`` (a query that would see nothing sees everything instead).

Mask logits are ``einsum("bqc,bchw->bqhw", mask_embed, mask_features)``, linear in ``mask_features``, and
bilinear resizing is linear too, so the logits resized to a level are the mask embeddings times
``mask_features`` resized to that level (once per level, not once per layer). Only the final layer's
logits are formed at full resolution (``pred_masks``); every layer returns its ``mask_embed``, from which
the criterion reads logits only where it needs them (``mask_logits.FactoredMaskLogits``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import sine_position_embedding


class CrossAttentionLayer(nn.Module):
    """``q = norm(q + MHA(q + q_pos, mem + pos, mem, attn_mask))``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor, query_pos: Tensor) -> Tensor:
        """``tgt``, ``query_pos``: ``(B, Q, C)``; ``memory``, ``pos``: ``(B, S, C)``; ``attn_mask``: ``(B*M, Q, S)`` bool."""
        out = self.attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class SelfAttentionLayer(nn.Module):
    """``q = norm(q + MHA(q + q_pos, q + q_pos, q))``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        out = self.attn(q, q, tgt, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    """``q = norm(q + W2 relu(W1 q))``."""

    def __init__(self, dim: int, dim_feedforward: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class MLP(nn.Sequential):
    """``num_layers`` linear layers with ReLU in between."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class MaskedTransformerDecoder(nn.Module):
    """Queries -> class logits and mask logits, with a prediction after every layer.

    Args:
        hidden_dim: query width ``D`` (= width of the multi-scale features).
        num_classes: ``K``; the class head outputs ``K + 1`` logits (last = no object).
        num_queries: ``Q``.
        num_layers: decoder layers (9).
        num_heads: attention heads ``M``.
        dim_feedforward: FFN width.
        num_feature_levels: levels used round-robin (3).
        mask_dim: channels of ``mask_features`` (default ``hidden_dim``).

    ``forward(multi_scale, mask_features)``: ``multi_scale`` = ``num_feature_levels`` maps
    ``(B, D, h_l, w_l)`` coarsest first, ``mask_features`` ``(B, mask_dim, H4, W4)`` ->
    ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H4, W4), "mask_embed": (B, Q, mask_dim),
    "mask_features": mask_features, "aux_outputs": [{"pred_logits", "mask_embed", "mask_features"}, ...]}``
    where ``aux_outputs`` holds the ``num_layers`` earlier predictions (the query-only one first); their mask
    logits are ``einsum("bqc,bchw->bqhw", mask_embed, mask_features)``.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        num_classes: int = 150,
        num_queries: int = 100,
        num_layers: int = 9,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        num_feature_levels: int = 3,
        mask_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_feature_levels = num_feature_levels
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.cross_attention_layers = nn.ModuleList(CrossAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.self_attention_layers = nn.ModuleList(SelfAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward, dropout) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim or hidden_dim, 3)

    def prediction_heads(self, queries: Tensor, attn_features: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``queries`` ``(B, Q, D)`` -> class logits ``(B, Q, K+1)``, mask embeddings ``(B, Q, C)`` and the attention mask
        ``(B*M, Q, h*w)`` bool from ``attn_features`` = ``mask_features`` resized to the next level ``(B, C, h, w)``
        (None after the last layer)."""
        x = self.decoder_norm(queries)
        logits = self.class_embed(x)
        embed = self.mask_embed(x)
        if attn_features is None:
            return logits, embed, None
        with torch.no_grad():
            small = torch.einsum("bqc,bchw->bqhw", embed, attn_features)  # = mask logits resized to (h, w)
            blocked = small.flatten(2).sigmoid() < 0.5  # (B, Q, h*w), True = may not attend
            blocked = blocked & ~blocked.all(-1, keepdim=True)  # a query that would see nothing sees everything
            blocked = blocked.repeat_interleave(self.num_heads, dim=0)  # (B*M, Q, h*w), batch-major like MHA
        return logits, embed, blocked

    def forward(self, multi_scale: Sequence[Tensor], mask_features: Tensor) -> dict:
        if len(multi_scale) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} levels, got {len(multi_scale)}")
        b = mask_features.shape[0]
        sizes, memories, positions = [], [], []
        for lvl, x in enumerate(multi_scale):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            positions.append(sine_position_embedding(b, h, w, self.hidden_dim, x.device, x.dtype).flatten(2).transpose(1, 2))
            memories.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl].to(x.dtype))
        with torch.no_grad():
            attn_features = [F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False) for size in sizes]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        queries = self.query_feat.weight[None].expand(b, -1, -1)

        predictions = []
        logits, embed, attn_mask = self.prediction_heads(queries, attn_features[0])
        predictions.append({"pred_logits": logits, "mask_embed": embed, "mask_features": mask_features})
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            queries = self.cross_attention_layers[i](queries, memories[lvl], attn_mask, positions[lvl], query_pos)
            queries = self.self_attention_layers[i](queries, query_pos)
            queries = self.ffn_layers[i](queries)
            last = i == self.num_layers - 1
            logits, embed, attn_mask = self.prediction_heads(
                queries, None if last else attn_features[(i + 1) % self.num_feature_levels])
            predictions.append({"pred_logits": logits, "mask_embed": embed, "mask_features": mask_features})
        out = dict(predictions[-1])
        out["pred_masks"] = torch.einsum("bqc,bchw->bqhw", embed, mask_features)
        out["aux_outputs"] = predictions[:-1]
        return out
