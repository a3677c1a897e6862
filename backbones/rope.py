"""DINOv3 RoPE whose position grid follows the input size in ``torch.export`` / ONNX graphs.

timm's ``RotaryEmbeddingDinoV3`` divides the patch centres by ``float(size)``; under ``torch.export`` a Python
float of a symbolic size is a constant of the example input, so an exported graph rotated every other input size
with the example's grid (the RoPE angles of a 7 x 5 patch grid were off by up to 2.0 with a 4 x 6 example, which
broke the ONNX export of Meta's detector). Dividing the tensor by the size itself keeps it symbolic; the values are
bit-identical to timm's in eager mode.
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from torch import nn


class TraceableDinoV3Rope(RotaryEmbeddingDinoV3):
    """``RotaryEmbeddingDinoV3`` with a size-symbolic grid for explicit shapes (inference; training augmentation
    and the cached embedding keep timm's path)."""

    def get_embed(self, shape=None, dtype=None) -> torch.Tensor:
        if shape is None or (self.training and self.aug_active):
            return super().get_embed(shape, dtype)
        sizes = list(shape)
        if self.normalize_coords == "separate":
            denominators = sizes
        elif self.normalize_coords in ("min", "max"):
            denominators = [(min if self.normalize_coords == "min" else max)(sizes)] * len(sizes)
        else:
            raise ValueError(f"unknown normalize_coords {self.normalize_coords!r}")
        axes = [(torch.arange(s, dtype=torch.float32) + 0.5 + self.grid_offset) / d
                for s, d in zip(sizes, denominators)]
        if self.grid_indexing == "xy":
            axes = axes[::-1]
        grid = 2.0 * torch.stack(torch.meshgrid(axes, indexing=self.grid_indexing), dim=-1) - 1.0
        sin, cos = self._get_pos_embed_from_coords(grid.flatten(0, -2))
        embed = torch.cat([sin, cos], dim=-1)
        return embed if dtype is None else embed.to(dtype)


def make_rope_traceable(model: nn.Module) -> None:
    """Give a timm DINOv3 ViT's RoPE module (``model.rope``) the traceable grid; other models are left alone."""
    rope = getattr(model, "rope", None)
    if type(rope) is RotaryEmbeddingDinoV3:
        rope.__class__ = TraceableDinoV3Rope
