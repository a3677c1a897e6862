"""Simple feature pyramid (ViTDet, Li et al. 2022): backbone maps -> pyramid levels at chosen strides.

Shared by the heads that need multi-scale inputs from a plain ViT (Mask2Former, the smp decoders). The output
strides are configurable (default 4/8/16/32; DeepLabV3+ reads 4/8/16/16).

Each output level ``i`` takes one input map, projects it to ``out_channels`` (1x1 conv + GroupNorm)
and then resamples it by powers of two: transposed 2x2 convolutions to go finer, stride-2 3x3
convolutions to go coarser, nothing when the stride already matches. Projecting *first* keeps the
parameter count proportional to ``out_channels`` rather than to the (possibly 1024-wide) backbone.

- A ViT gives 4 maps at stride 16: shallow -> stride 4 (2 deconvs), next -> 8 (1 deconv),
  next -> 16 (identity), deepest -> 32 (strided conv).
- A ConvNeXt gives maps at strides 4/8/16/32: projection only.
- Any other output strides: the same rule, e.g. a stride-32 ConvNeXt map -> 16 by one deconv.
- Any other number of maps: level ``i`` reads map ``round(i * (n - 1) / 3)`` (one map feeds all levels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

PYRAMID_STRIDES = (4, 8, 16, 32)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer when ``channels`` is small / not divisible."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


class _Resample(nn.Sequential):
    """Resample ``(B, C, h, w)`` by ``2 ** log2_scale`` (positive = upsample)."""

    def __init__(self, channels: int, log2_scale: int):
        layers: list[nn.Module] = []
        for i in range(abs(log2_scale)):
            if i > 0:
                layers += [group_norm(channels), nn.GELU()]
            if log2_scale > 0:
                layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
            else:
                layers.append(nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1))
        if layers:
            layers.append(group_norm(channels))
        super().__init__(*layers)


class SimpleFeaturePyramid(nn.Module):
    """Backbone maps -> ``len(out_strides)`` maps of ``out_channels`` at ``out_strides``.

    Args:
        in_channels: ``C_i`` of each backbone map (shallow -> deep).
        strides: stride of each backbone map (powers of two).
        out_channels: width of every output map.
        out_strides: strides of the outputs (default 4, 8, 16, 32).

    ``forward(maps)``: list of ``(B, C_i, h_i, w_i)`` -> list of ``(B, out_channels, H / s, W / s)``
    for ``s`` in ``out_strides`` (rounded as the convolutions round: ceil for stride-2 convs).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        out_channels: int,
        out_strides: Sequence[int] = PYRAMID_STRIDES,
    ):
        super().__init__()
        if len(in_channels) != len(strides) or not in_channels:
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} must be equal-length, non-empty")
        self.out_strides = tuple(out_strides)
        n_in, n_out = len(in_channels), len(self.out_strides)
        self.sources = [round(i * (n_in - 1) / max(n_out - 1, 1)) for i in range(n_out)] if n_in != n_out else list(range(n_out))
        self.proj = nn.ModuleList()
        self.resample = nn.ModuleList()
        for level, src in enumerate(self.sources):
            ratio = strides[src] / self.out_strides[level]
            log2_scale = round(math.log2(ratio))
            if 2.0**log2_scale != ratio:
                raise ValueError(f"stride {strides[src]} cannot be resampled to {self.out_strides[level]} by powers of 2")
            self.proj.append(nn.Sequential(nn.Conv2d(in_channels[src], out_channels, 1), group_norm(out_channels)))
            self.resample.append(_Resample(out_channels, log2_scale))

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """``maps``: the backbone maps -> pyramid levels, finest first."""
        return [res(proj(maps[src])) for src, proj, res in zip(self.sources, self.proj, self.resample)]
