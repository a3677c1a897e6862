"""Plain-DETR's global encoder: post-norm transformer layers with full self-attention over one feature map."""

from __future__ import annotations

from torch import Tensor, nn


class GlobalEncoderLayer(nn.Module):
    """Self-attention (position added to queries and keys) and a ReLU FFN, each followed by a residual and LayerNorm.

    Args:
        dim: token width ``D``; num_heads: attention heads; ffn_dim: FFN width; dropout: after attention and in the FFN.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``src (B, S, D)``, ``pos (B or 1, S, D)``, ``padding_mask (B, S)`` bool (``True``: a padded token, never
        attended to) -> ``(B, S, D)``."""
        q = src + pos
        attn = self.self_attn(q, q, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(self.linear1(src).relu()))
        return self.norm2(src + self.dropout(ffn))


class GlobalEncoder(nn.Module):
    """``num_layers`` :class:`GlobalEncoderLayer` s (no final norm)."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(GlobalEncoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, padding_mask)
        return src
