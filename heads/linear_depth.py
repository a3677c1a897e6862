"""Meta's linear depth probe: BatchNorm + 1x1 conv to depth-bin logits on the patch grid (dinov3 ``config-nyu.yaml``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.features import Features
from heads.depth_losses import DepthCriterion
from heads.ops.depth_bins import BinsToDepth
from heads.ops.ms_deform_attn import as_size


class LinearDepthHead(nn.Module):
    """Maps resized to the first one's grid, concatenated [with the class token] -> BatchNorm -> 1x1 conv.

    ``num_bins > 1``: logits mixed into depth (``heads.ops.depth_bins``, Meta: ``linspace`` + ``linear`` norm) on
    the patch grid; the depth ``(B, 1, h, w)`` is resized bilinearly to the targets by the loss and to the image
    by ``predict`` (Meta resizes its depth the same way). ``num_bins == 1``: ``relu(x) + min_depth``.

    Args:
        in_channels: channels of the maps used (Meta's recipe: the last ViT layer only, ``backbone.out_indices=[-1]``).
        num_bins, bin_spacing, bin_placement, bin_norm, min_depth, max_depth: the depth bins.
        use_cls: concatenate each layer's class token to every patch (Meta's ``use_cls_token``; its NYU recipe: no).
        batchnorm: BatchNorm before the conv (Meta's ``use_batchnorm``).
        silog_lambda, silog_unbiased, silog_warmup: the SiLog loss (``heads.depth_losses.DepthCriterion``).
        input_padding: ``center`` (Meta's depther) or ``corner``, read by ``DenseModel``.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_bins: int = 256,
                 bin_spacing: str = "linear", bin_placement: str = "linspace", bin_norm: str = "linear",
                 min_depth: float = 0.001, max_depth: float = 10.0, use_cls: bool = False, batchnorm: bool = True,
                 silog_lambda: float = 0.15, silog_unbiased: bool = True, silog_warmup: int = 100,
                 input_padding: str = "center"):
        super().__init__()
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        if input_padding not in ("center", "corner"):
            raise ValueError(f"input_padding must be 'center' or 'corner', got {input_padding!r}")
        channels = sum(in_channels) * (2 if use_cls else 1)
        self.use_cls, self.min_depth, self.input_padding = bool(use_cls), float(min_depth), input_padding
        self.batchnorm = nn.BatchNorm2d(channels) if batchnorm else None
        self.conv = nn.Conv2d(channels, num_bins, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)
        self.to_depth = (BinsToDepth(num_bins, min_depth, max_depth, bin_spacing, bin_placement, bin_norm)
                         if num_bins > 1 else None)
        self.criterion = DepthCriterion(min_depth, max_depth, silog_lambda, silog_unbiased, silog_warmup)

    def forward(self, features: Features, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """-> ``{"depth": (B, 1, h, w), "logits": (B, K, h, w)}`` on the first map's grid."""
        size = features.maps[0].shape[-2:]
        maps = []
        for i, m in enumerate(features.maps):
            if self.use_cls:
                if features.cls is None:
                    raise ValueError("use_cls=True needs class tokens (features.cls), got None")
                m = torch.cat([m, features.cls[i][:, :, None, None].expand_as(m)], dim=1)
            maps.append(F.interpolate(m, size, mode="bilinear", align_corners=False))
        x = torch.cat(maps, dim=1)
        if self.batchnorm is not None:
            x = self.batchnorm(x)
        logits = self.conv(x)
        if self.to_depth is None:
            depth = F.relu(logits.float()) + self.min_depth
        else:
            depth = self.to_depth(logits)
        return {"depth": depth, "logits": logits}

    def loss(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """SiLog of the depth resized to the targets ``(B, H, W)`` (metres, 0 = invalid)."""
        return self.criterion(outputs, targets)

    def predict(self, outputs: dict[str, Tensor], image_size: tuple[int, int]) -> Tensor:
        """Depth ``(B, 1, H, W)`` in metres at ``image_size`` (bilinear, align_corners=False)."""
        size = (as_size(image_size[0]), as_size(image_size[1]))
        return F.interpolate(outputs["depth"], size=size, mode="bilinear", align_corners=False)
