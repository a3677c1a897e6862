"""DPT reassemble step: one ViT (or ConvNeXt) layer -> a map at the target stride of the fusion pyramid."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def resize_layer(channels: int, stride: int, target: int) -> nn.Module:
    """Module that moves a ``(B, C, h, w)`` map from ``stride`` to ``target`` stride (powers-of-two ratios).

    Up: ``ConvTranspose2d(kernel=r, stride=r)``; down: 3x3 conv with stride ``r`` and padding 1 (output
    ``ceil(h / r)``, so odd maps keep their last row/column); equal: identity.
    """
    if stride == target:
        return nn.Identity()
    if stride > target:
        if stride % target:
            raise ValueError(f"cannot upsample stride {stride} to {target}: not an integer factor")
        r = stride // target
        return nn.ConvTranspose2d(channels, channels, kernel_size=r, stride=r)
    if target % stride:
        raise ValueError(f"cannot downsample stride {stride} to {target}: not an integer factor")
    return nn.Conv2d(channels, channels, kernel_size=3, stride=target // stride, padding=1)


class Reassemble(nn.Module):
    """One layer: readout -> [BatchNorm] -> 1x1 conv -> resize -> 3x3 conv (no bias).

    ``(B, C, h, w) [+ cls (B, C)] -> (B, F, h', w')``.

    Args:
        in_channels, post_channels, features: ``C``, the width after the 1x1 projection, the fusion width ``F``.
        stride, target: the map's stride and the pyramid stride it is moved to.
        readout: the class token: ``ignore``, ``add`` (to every patch) or ``project`` (concatenated to every
            patch, ``Linear(2C -> C)`` + GELU).
        norm: ``BatchNorm2d(C)`` on the layer before the projection (Meta's ``use_batchnorm``).
    """

    def __init__(self, in_channels: int, post_channels: int, features: int, stride: int, target: int,
                 readout: str, norm: bool = False):
        super().__init__()
        self.readout = readout
        self.readout_project = (
            nn.Sequential(nn.Linear(2 * in_channels, in_channels), nn.GELU()) if readout == "project" else None
        )
        self.norm = nn.BatchNorm2d(in_channels) if norm else None
        self.project = nn.Conv2d(in_channels, post_channels, 1)
        self.resize = resize_layer(post_channels, stride, target)
        self.layer_rn = nn.Conv2d(post_channels, features, 3, padding=1, bias=False)

    def forward(self, x: Tensor, cls: Tensor | None) -> Tensor:
        if self.readout != "ignore":
            if cls is None:
                raise ValueError(f"readout={self.readout!r} needs class tokens (features.cls), got None")
            if self.readout == "add":
                x = x + cls[:, :, None, None]
            else:
                b, c, h, w = x.shape
                tokens = x.flatten(2).transpose(1, 2)  # (B, hw, C)
                tokens = torch.cat([tokens, cls[:, None, :].expand(-1, h * w, -1)], dim=-1)
                x = self.readout_project(tokens).transpose(1, 2).reshape(b, c, h, w)
        if self.norm is not None:
            x = self.norm(x)
        return self.layer_rn(self.resize(self.project(x)))
