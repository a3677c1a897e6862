"""Where the input is padded to the backbone's stride: bottom/right (the backbone does it) or centred.

Meta's depther centre-pads its input to the patch multiple (``CenterPadding``); a head asks for the same with
``input_padding = "center"`` (``heads.dpt.DPTHead``). Every other head leaves it to the backbone (bottom/right).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def center_pad(images: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad ``(B, C, H, W)`` to multiples of ``multiple``, the extra pixel of an odd padding at the bottom /
    right. Returns the padded images and the ``(top, left)`` offset of the original inside them."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:
        images = F.pad(images, (left, pad_w - left, top, pad_h - top))
    return images, (top, left)


def pad_for_head(images: Tensor, multiple: int, head: nn.Module) -> tuple[Tensor, tuple[int, int]]:
    """Centre-pad when ``head.input_padding == "center"``; else the images unchanged and offset ``(0, 0)``."""
    if getattr(head, "input_padding", "corner") == "center":
        return center_pad(images, multiple)
    return images, (0, 0)
