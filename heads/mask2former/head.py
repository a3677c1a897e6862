"""Mask2Former semantic-segmentation head on backbone ``Features``.

``SimpleFeaturePyramid`` (strides 4/8/16/32, ``hidden_dim`` wide) -> ``MSDeformAttnPixelDecoder``
(per-pixel embeddings at 1/4 + 3 refined levels) -> ``MaskedTransformerDecoder`` (``num_queries``
class logits and mask logits per layer) -> ``Mask2FormerCriterion`` for training, and
``softmax(class)[..., :-1] x sigmoid(mask)`` summed over queries for the semantic prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .criterion import Mask2FormerCriterion, semantic_to_targets
from .pixel_decoder import MSDeformAttnPixelDecoder
from .pyramid import SimpleFeaturePyramid
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

    ``forward(features, image_size)`` -> ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, ceil(H/4), ceil(W/4)),
    "aux_outputs": [{"pred_logits", "pred_masks"}] * dec_layers}``.
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
    ):
        super().__init__()
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        dim_feedforward = dim_feedforward or 4 * hidden_dim
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.pyramid = SimpleFeaturePyramid(in_channels, strides, hidden_dim)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            hidden_dim, num_heads, enc_layers, dim_feedforward, deform_points, num_encoder_levels=3, num_levels=4
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
        """``features``: ``Features`` (or anything with ``.maps``); ``image_size``: padded input ``(H, W)``."""
        dtype = self.pixel_decoder.level_embed.dtype
        levels = self.pyramid([m.to(dtype) for m in features.maps])
        mask_features, multi_scale = self.pixel_decoder(levels)
        size = (math.ceil(image_size[0] / 4), math.ceil(image_size[1] / 4))
        if tuple(mask_features.shape[-2:]) != size:
            mask_features = F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
        return self.transformer_decoder(multi_scale, mask_features)

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
