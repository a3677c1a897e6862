"""Mask2Former semantic-segmentation head on backbone ``Features``.

neck (strides 4/8/16/32) -> ``MSDeformAttnPixelDecoder`` (per-pixel embeddings at 1/4 + 3 refined
levels) -> ``MaskedTransformerDecoder`` (``num_queries`` class logits and mask logits per layer) ->
``Mask2FormerCriterion`` for training, and ``softmax(class)[..., :-1] x sigmoid(mask)`` summed over
queries for the semantic prediction.

Necks: ``pyramid`` (``SimpleFeaturePyramid``: resampled backbone maps, any backbone) or ``adapter``
(``ViTAdapter``, Meta's DINOv3 segmentor: a conv stem on the input pixels that reads four ViT layers by
deformable attention; it takes the images from ``Features.images``). Pixel-decoder layouts: ``projected``
(every level is brought to ``hidden_dim`` by the neck: 1x1 conv + GroupNorm) or ``meta`` (the decoder
projects the three coarse levels itself and the stride-4 level enters its lateral conv unprojected).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.pyramid import SimpleFeaturePyramid, group_norm
from .adapter import ViTAdapter
from .criterion import Mask2FormerCriterion, semantic_to_targets
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MaskedTransformerDecoder


class Mask2FormerHead(nn.Module):
    """Mask2Former head.

    Args:
        in_channels: channels of each backbone map.
        strides: stride of each backbone map (all 16 for a ViT, 4/8/16/32 for a ConvNeXt).
        num_classes: ``K`` semantic classes (labels ``0..K-1``, ``ignore_index`` = ignore).
        hidden_dim: width of pyramid, pixel decoder, queries and mask embeddings.
        num_queries: ``Q``.
        dec_layers: transformer decoder layers (predictions after each, plus one before the first).
        enc_layers: MSDeformAttn encoder layers of the pixel decoder.
        num_heads: attention heads of the encoder and decoder.
        dim_feedforward: FFN width (default ``4 * hidden_dim``).
        num_points: points per mask for the mask losses and the matcher.
        oversample_ratio, importance_sample_ratio: uncertainty point sampling.
        class_weight, mask_weight, dice_weight: loss and matching-cost weights.
        no_object_weight: CE weight of the no-object class.
        deep_supervision: also supervise every auxiliary prediction.
        deform_points: MSDeformAttn sampling points per head and level.
        ignore_index: label ignored in the targets.
        neck: ``pyramid`` | ``adapter`` (ViT backbones only: four maps of one width at one stride).
        pixel_decoder_layout: ``projected`` | ``meta`` (see the module docstring).
        adapter: keyword arguments of ``ViTAdapter`` (``conv_inplanes``, ``num_heads``, ``num_points``,
            ``value_ratio``, ``ffn_ratio``, ``drop_path_rate``, ``extra_extractors``, ``add_vit_features``,
            ``grad_checkpointing``), used when ``neck="adapter"``.
        fp32_pixel_decoder: run the pixel decoder in float32 even under autocast (Meta's head does).

    ``forward(features, image_size)`` -> ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, ceil(H/4), ceil(W/4)),
    "mask_embed": (B, Q, C), "mask_features": (B, C, ceil(H/4), ceil(W/4)),
    "aux_outputs": [{"pred_logits", "mask_embed", "mask_features"}] * dec_layers}`` (see ``MaskedTransformerDecoder``).
    """

    output_stride = 4  # mask logits live at 1/4 of the input

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        dec_layers: int = 9,
        enc_layers: int = 6,
        num_heads: int = 8,
        dim_feedforward: int | None = None,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        deep_supervision: bool = True,
        deform_points: int = 4,
        ignore_index: int = 255,
        neck: str = "pyramid",
        pixel_decoder_layout: str = "projected",
        adapter: dict | None = None,
        fp32_pixel_decoder: bool = False,
    ):
        super().__init__()
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        dim_feedforward = dim_feedforward or 4 * hidden_dim
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        if neck not in ("pyramid", "adapter"):
            raise ValueError(f"neck must be 'pyramid' or 'adapter', got {neck!r}")
        if pixel_decoder_layout not in ("projected", "meta"):
            raise ValueError(f"pixel_decoder_layout must be 'projected' or 'meta', got {pixel_decoder_layout!r}")
        self.neck = neck
        self.fp32_pixel_decoder = fp32_pixel_decoder
        self.level_proj = None
        if neck == "adapter":
            if len(in_channels) != 4 or len(set(in_channels)) != 1 or len(set(strides)) != 1:
                raise ValueError(f"neck='adapter' needs a ViT: 4 maps of one width at one stride, got channels "
                                 f"{list(in_channels)} at strides {list(strides)}")
            self.adapter = ViTAdapter(in_channels[0], **dict(adapter or {}))
            level_channels = [in_channels[0]] * 4
            if pixel_decoder_layout == "projected":
                self.level_proj = nn.ModuleList(
                    nn.Sequential(nn.Conv2d(c, hidden_dim, 1), group_norm(hidden_dim)) for c in level_channels)
                level_channels = [hidden_dim] * 4
        else:
            self.pyramid = SimpleFeaturePyramid(in_channels, strides, hidden_dim)
            level_channels = [hidden_dim] * 4
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            hidden_dim, num_heads, enc_layers, dim_feedforward, deform_points, num_encoder_levels=3, num_levels=4,
            in_channels=level_channels if pixel_decoder_layout == "meta" else None,
        )
        self.transformer_decoder = MaskedTransformerDecoder(
            hidden_dim, num_classes, num_queries, dec_layers, num_heads, dim_feedforward, num_feature_levels=3
        )
        self.criterion = Mask2FormerCriterion(
            num_classes,
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            no_object_weight=no_object_weight,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
            deep_supervision=deep_supervision,
        )

    def forward(self, features, image_size: tuple[int, int]) -> dict:
        """``features``: ``Features`` (or anything with ``.maps``, and ``.images`` for the adapter);
        ``image_size``: padded input ``(H, W)``."""
        levels = self.neck_levels(features)
        device_type = levels[0].device.type
        if self.fp32_pixel_decoder and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                mask_features, multi_scale = self.pixel_decoder([level.float() for level in levels])
        else:
            mask_features, multi_scale = self.pixel_decoder(levels)
        size = (math.ceil(image_size[0] / 4), math.ceil(image_size[1] / 4))
        if tuple(mask_features.shape[-2:]) != size:
            mask_features = F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
        return self.transformer_decoder(multi_scale, mask_features)

    def neck_levels(self, features) -> list[Tensor]:
        """The pixel decoder's input: 4 levels ``(B, C, H / s, W / s)``, ``s`` = 4, 8, 16, 32."""
        dtype = self.pixel_decoder.level_embed.dtype
        maps = [m.to(dtype) for m in features.maps]
        if self.neck == "pyramid":
            return self.pyramid(maps)
        images = getattr(features, "images", None)
        if images is None:
            raise ValueError("neck='adapter' reads the input pixels, but Features.images is None: pass Features "
                             "from backbones.DinoBackbone (or set images=the normalized, padded input)")
        levels = self.adapter(images.to(dtype), maps)
        if self.level_proj is not None:
            levels = [proj(level) for proj, level in zip(self.level_proj, levels)]
        return levels

    def loss(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        """``targets["mask"]``: ``(B, H, W)`` long -> weighted ``{"loss_ce", "loss_mask", "loss_dice"}`` summed over layers."""
        mask = targets["mask"].to(outputs["pred_masks"].device)
        return self.criterion(outputs, semantic_to_targets(mask, self.num_classes, self.ignore_index))

    def predict(self, outputs: dict, image_size: tuple[int, int]) -> Tensor:
        """Per-class scores ``(B, K, H, W)``: ``sum_q softmax(logits)[q, :K] * sigmoid(upsampled mask_q)``."""
        probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]
        masks = F.interpolate(outputs["pred_masks"].float(), size=tuple(image_size), mode="bilinear", align_corners=False)
        return torch.einsum("bqk,bqhw->bkhw", probs, masks.sigmoid())

    def predict_native(self, outputs: dict) -> Tensor:
        """Per-class scores ``(B, K, ceil(H/4), ceil(W/4))`` on the mask grid: like ``predict`` but the sigmoid is
        taken before upsampling, so scores upsampled from here differ slightly from ``predict``'s."""
        probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]
        return torch.einsum("bqk,bqhw->bkhw", probs, outputs["pred_masks"].float().sigmoid())
