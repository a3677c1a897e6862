"""DPT fusion: RefineNet-style blocks that merge the pyramid from coarse to fine."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

UPSAMPLE_MODES = ("x2", "to_skip")


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit ``x + conv(relu(conv(relu(x))))``: ``(B, C, h, w) -> (B, C, h, w)``.

    ``bias=False`` is Meta's DPT (its released heads have bias-free residual convs).
    """

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """``x (+ RCU(skip))`` -> RCU -> bilinear upsampling (align_corners=True) -> 1x1 conv.

    ``x``: ``(B, F, h, w)``; ``skip``: ``(B, F, h_s, w_s)`` or None (the coarsest block has no skip).

    Two ways to line ``x`` up with the finer level, ``upsample``:
        ``x2`` (Meta's DPT): the output is always ``2h x 2w``; a skip of another size is resized to ``x``
            (bilinear, align_corners=False), so an odd stride-32 grid stretches the finer levels by up to a cell.
        ``to_skip``: ``x`` is resized to the skip's size, and the output to ``size`` (the next finer level):
            every level keeps its own grid exactly.
    """

    def __init__(self, channels: int, has_skip: bool = True, upsample: str = "to_skip", bias: bool = True):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"fusion_upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.upsample = upsample
        self.skip_unit = ResidualConvUnit(channels, bias) if has_skip else None
        self.unit = ResidualConvUnit(channels, bias)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            if self.skip_unit is None:
                raise ValueError("this fusion block was built without a skip input")
            if self.upsample == "x2":
                # an interpolation to the same size is the identity: no shape test, so it traces (ONNX)
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            elif x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        if self.upsample == "x2":
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.project(x)
