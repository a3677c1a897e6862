"""A segmentation_models_pytorch decoder (FPN, UPerNet, Segformer, DeepLabV3+, DPT) as a head on backbone ``Features``.

``maps ──► [SimpleFeaturePyramid] ──► smp decoder ──► smp segmentation head ──► logits (B, K, H, W)``

The pyramid is built only when the decoder reads other strides than the backbone gives: a ViT's four stride-16
maps become strides 4/8/16/32 (4/8/16/16 for DeepLabV3+), ``pyramid_channels`` wide; a ConvNeXt's native
4/8/16/32 maps go in as they are (DeepLabV3+ still resamples its stride-32 map to 16). DPT reassembles the ViT's
stride-16 maps itself and reads the class tokens (``readout``). Multi-bin adaptive pooling (UPerNet's PSP) is
swapped for an equal version that exports to ONNX with dynamic sizes (``pooling.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from segmentation_models_pytorch.base.initialization import initialize_decoder, initialize_head
from torch import Tensor, nn

from backbones.features import Features

from ..ops.pyramid import SimpleFeaturePyramid
from ..seg_losses import SegLoss
from .decoders import DECODERS, call_decoder
from .pooling import export_safe_pooling


class SMPHead(nn.Module):
    """smp decoder + segmentation head, trained with ``heads.seg_losses.SegLoss``.

    Args:
        in_channels, strides: of the backbone maps (shallow -> deep).
        num_classes: K.
        decoder: a name in ``DECODERS``: ``fpn``, ``upernet``, ``segformer``, ``deeplabv3plus``, ``dpt``.
        decoder_args: keyword arguments of the smp decoder class over the smp model's defaults, e.g.
            ``{"decoder_channels": 128}`` (UPerNet), ``{"pyramid_channels": 128}`` (FPN).
        pyramid_channels: width of the ViT-to-pyramid levels (when a pyramid is needed).
        loss, loss_weights, avg_non_ignore, loss_options: see ``SegLoss`` (default cross-entropy).

    ViT class tokens are read by DPT when all maps share one stride (a plain ViT); a ConvNeXt has none.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int, decoder: str = "upernet",
                 decoder_args: Mapping | None = None, pyramid_channels: int = 256, loss="ce", loss_weights=None,
                 avg_non_ignore: bool = True, loss_options=None):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"head.decoder={decoder!r}: expected one of {sorted(DECODERS)}")
        spec = DECODERS[decoder]
        unknown = set(decoder_args or {}) - set(spec.defaults)
        if unknown:
            raise ValueError(f"head.decoder_args {sorted(unknown)} are not arguments of smp's {decoder} decoder "
                             f"(known: {sorted(spec.defaults)})")
        kwargs = {**spec.defaults, **dict(decoder_args or {})}
        self.name, self.multiple = decoder, spec.multiple
        self.in_strides = list(strides)
        self.uses_cls = len(set(strides)) == 1
        wanted = list(spec.level_strides(kwargs)) if spec.level_strides else list(strides)
        self.read = [i for i, s in enumerate(wanted) if s is not None]  # levels the decoder reads
        self.num_levels = len(wanted)
        if len(wanted) == len(strides) and all(wanted[i] == strides[i] for i in self.read):
            self.pyramid = None  # the maps go in as they are
            channels, level_strides = list(in_channels), list(strides)
        else:  # build only the levels the decoder reads; the others are zero-channel placeholders
            self.pyramid = SimpleFeaturePyramid(in_channels, strides, pyramid_channels, [wanted[i] for i in self.read])
            channels = [pyramid_channels if i in self.read else 0 for i in range(len(wanted))]
            level_strides = wanted
        self.decoder = export_safe_pooling(spec.build(channels, level_strides, self.uses_cls, kwargs))
        self.segmentation_head = spec.head(spec.width(self.decoder, kwargs), num_classes)
        initialize_decoder(self.decoder)
        initialize_head(self.segmentation_head)
        self.criterion = SegLoss(loss, loss_weights, avg_non_ignore=avg_non_ignore, loss_options=loss_options)

    def _pad(self, maps: list[Tensor]) -> list[Tensor]:
        """Zero-pad maps bottom/right so the input they cover is a multiple of ``self.multiple`` pixels."""
        padded = []
        for m, stride in zip(maps, self.in_strides):
            cells = max(self.multiple // stride, 1)
            pad_h, pad_w = (-m.shape[-2]) % cells, (-m.shape[-1]) % cells
            padded.append(F.pad(m, (0, pad_w, 0, pad_h)))
        return padded

    def _levels(self, built: list[Tensor]) -> list[Tensor]:
        """Pyramid outputs at the read positions, ``(B, 0, h, w)`` placeholders at the others."""
        placeholder = built[0].new_zeros(built[0].shape[0], 0, *built[0].shape[-2:])
        levels = [placeholder] * self.num_levels
        for i, level in zip(self.read, built):
            levels[i] = level
        return levels

    def forward(self, features: Features, image_size: tuple[int, int]) -> Tensor:
        """Returns logits ``(B, K, H, W)`` on the input grid the maps cover (``H = h_0 * stride_0``)."""
        maps = [m.float() for m in features.maps]
        height, width = maps[0].shape[-2] * self.in_strides[0], maps[0].shape[-1] * self.in_strides[0]
        if self.multiple > 1:
            maps = self._pad(maps)
        cls = None
        if self.name == "dpt" and self.uses_cls:
            if features.cls is None:
                raise ValueError("the DPT head was built for a ViT (equal strides) and reads class tokens, "
                                 "but these features have none")
            cls = [c.float() for c in features.cls]
        levels = maps if self.pyramid is None else self._levels(self.pyramid(maps))
        logits = self.segmentation_head(call_decoder(self.name, self.decoder, levels, cls))
        return logits[..., :height, :width]

    def loss(self, outputs: Tensor, targets: dict) -> dict[str, Tensor]:
        """The configured losses against ``targets["mask"]`` ``(B, H, W)``, 255 ignored."""
        return self.criterion(outputs, targets["mask"])

    def predict(self, outputs: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Class logits ``(B, K, H, W)`` at ``image_size``."""
        return F.interpolate(outputs, image_size, mode="bilinear", align_corners=False)

