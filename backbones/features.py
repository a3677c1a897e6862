"""The one value that flows from a backbone to a head."""

from dataclasses import dataclass, field

import torch


@dataclass
class Features:
    """Multi-layer backbone output.

    Attributes:
        maps: one ``(B, C_i, h_i, w_i)`` map per requested layer, shallow to deep.
        cls: one ``(B, C_i)`` class token per layer for ViTs, ``None`` for ConvNeXt.
        strides: input pixels per feature cell of each map (16 for every ViT layer; 4/8/16/32 for ConvNeXt).
        channels: ``C_i`` of each map.
        patch_size: the ViT patch size (16), or the ConvNeXt stem stride (4).
        padded_size: ``(H, W)`` of the input after bottom/right padding to a multiple of the
            backbone's stride; the maps cover this size, the original image is its top-left corner.
        images: the normalized input ``(B, 3, H, W)`` at ``padded_size``, for heads that also read pixels
            (the ViT-Adapter's convolutional spatial prior); ``None`` when the maps come from elsewhere.
        padding_mask: ``(B, H, W)`` bool at ``padded_size``, ``True`` on pixels outside each image of a batch of
            differently sized images padded bottom/right to one size (DETR's mask); ``None``: every pixel is
            image. Set by the caller that padded the batch (``tasks.detection``); read by
            ``heads.detr.PlainDETRHead``, ignored by the other heads.
    """

    maps: list[torch.Tensor]
    cls: list[torch.Tensor] | None
    strides: list[int]
    channels: list[int]
    patch_size: int
    padded_size: tuple[int, int] = field(default=(0, 0))
    images: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
