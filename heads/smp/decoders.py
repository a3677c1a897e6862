"""segmentation_models_pytorch decoders by name, and the shims that feed them backbone maps.

Each entry builds smp's own decoder and segmentation-head modules with the defaults of the matching smp model
(``smp.FPN``, ``smp.UPerNet``, ...), so a head built here equals the decoder + segmentation head of that model.

smp's pyramid decoders read an encoder's list ``[stride 1, 2, 4, 8, 16, 32]`` with ``encoder_channels`` to match.
We hand them four levels (strides 4/8/16/32, or 4/8/16/16 for DeepLabV3+) and two zero-channel placeholders for
strides 1 and 2: a ``0`` channel count at stride 2 is smp's own convention for encoders without that stage (the
MiT encoders of Segformer), and no decoder here reads channels from those two entries (Segformer reads the
stride-1 entry's size only). DPT reads the ViT's stride-16 maps and class tokens as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from segmentation_models_pytorch.base.heads import SegmentationHead
from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder, DPTSegmentationHead
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import Tensor, nn


def encoder_channels(channels: Sequence[int]) -> list[int]:
    """smp's ``encoder.out_channels`` for four levels at strides 4..32: the image (3) and an absent stride-2 stage (0)."""
    return [3, 0, *channels]


def encoder_features(levels: Sequence[Tensor]) -> list[Tensor]:
    """smp's encoder output for four levels ``(B, C_i, H / s_i, W / s_i)``, finest (stride 4) first: two zero-channel
    placeholders ``(B, 0, H, W)`` and ``(B, 0, H / 2, W / 2)`` in front."""
    first = levels[0]
    batch, (height, width) = first.shape[0], first.shape[-2:]
    return [first.new_zeros(batch, 0, 4 * height, 4 * width), first.new_zeros(batch, 0, 2 * height, 2 * width), *levels]


@dataclass(frozen=True)
class DecoderSpec:
    """How to build one smp decoder and its segmentation head.

    Attributes:
        defaults: the decoder's keyword arguments as the smp model sets them (overridable per head).
        build: ``(in_channels, strides, has_cls, kwargs) -> decoder``.
        width: ``(decoder, kwargs) -> channels`` of the decoder output.
        level_strides: ``kwargs -> strides`` of its four input levels, ``None`` for a level it does not read;
            ``level_strides=None``: the backbone maps as they are.
        multiple: input sides the decoder needs to be a multiple of (maps are zero-padded up to it, the output cropped).
        head: ``(width, num_classes) -> segmentation head`` (smp's, with the model's kernel size and upsampling).
    """

    defaults: dict
    build: Callable[..., nn.Module]
    width: Callable[[nn.Module, dict], int]
    level_strides: Callable[[dict], tuple[int, ...]] | None
    head: Callable[[int, int], nn.Module]
    multiple: int = 1


def _pyramid(cls) -> Callable[..., nn.Module]:
    def build(in_channels, strides, has_cls, kwargs):
        return cls(encoder_channels=encoder_channels(in_channels), encoder_depth=5, **kwargs)
    return build


def _dpt(in_channels, strides, has_cls, kwargs):
    if len(in_channels) != len(kwargs["intermediate_channels"]):
        raise ValueError(f"DPT: {len(in_channels)} backbone maps but intermediate_channels="
                         f"{list(kwargs['intermediate_channels'])}; give one per map")
    return DPTDecoder(encoder_out_channels=list(in_channels), encoder_output_strides=list(strides),
                      encoder_has_prefix_tokens=has_cls, **kwargs)


def _seg_head(kernel_size: int, upsampling: int) -> Callable[[int, int], nn.Module]:
    return lambda width, num_classes: SegmentationHead(width, num_classes, kernel_size=kernel_size, upsampling=upsampling)


_PYRAMID = lambda kwargs: (4, 8, 16, 32)  # noqa: E731  (DeepLabV3+ reads only the finest and the deepest)

DECODERS: dict[str, DecoderSpec] = {
    "fpn": DecoderSpec(
        defaults=dict(pyramid_channels=256, segmentation_channels=128, dropout=0.2, merge_policy="add",
                      interpolation_mode="nearest"),
        build=_pyramid(FPNDecoder), width=lambda decoder, kwargs: decoder.out_channels, level_strides=_PYRAMID,
        head=_seg_head(1, 4), multiple=32),
    "upernet": DecoderSpec(
        defaults=dict(decoder_channels=256, use_norm="batchnorm"),
        build=_pyramid(UPerNetDecoder), width=lambda decoder, kwargs: kwargs["decoder_channels"],
        level_strides=_PYRAMID, head=_seg_head(1, 4)),
    "segformer": DecoderSpec(
        defaults=dict(segmentation_channels=256),
        build=_pyramid(SegformerDecoder), width=lambda decoder, kwargs: kwargs["segmentation_channels"],
        level_strides=_PYRAMID, head=_seg_head(1, 4)),
    "deeplabv3plus": DecoderSpec(
        defaults=dict(out_channels=256, atrous_rates=(12, 24, 36), output_stride=16, aspp_separable=True,
                      aspp_dropout=0.5),
        build=_pyramid(DeepLabV3PlusDecoder), width=lambda decoder, kwargs: kwargs["out_channels"],
        level_strides=lambda kwargs: (4, None, None, kwargs["output_stride"]), head=_seg_head(1, 4)),
    "dpt": DecoderSpec(
        defaults=dict(readout="cat", intermediate_channels=(256, 512, 1024, 1024), fusion_channels=256),
        build=_dpt, width=lambda decoder, kwargs: kwargs["fusion_channels"], level_strides=None,
        head=lambda width, num_classes: DPTSegmentationHead(width, num_classes, kernel_size=3, upsampling=2),
        multiple=32),
}


def call_decoder(name: str, decoder: nn.Module, levels: list[Tensor], cls: list[Tensor] | None) -> Tensor:
    """Run ``decoder`` (built by ``DECODERS[name]``) on ``levels`` (and ViT class tokens ``(B, C)`` for DPT)."""
    if name == "dpt":
        prefix = [c[:, None] for c in cls] if cls is not None else [None] * len(levels)
        return decoder(levels, prefix)
    return decoder(encoder_features(levels))

