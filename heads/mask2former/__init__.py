"""Mask2Former semantic-segmentation head (masked-attention mask transformer) for backbone ``Features``."""

from .criterion import Mask2FormerCriterion, average_num_masks, semantic_to_targets
from .head import Mask2FormerHead
from .matcher import HungarianMatcher
from .ms_deform_attn import MSDeformAttn
from .pixel_decoder import MSDeformAttnPixelDecoder
from .pyramid import SimpleFeaturePyramid
from .transformer_decoder import MaskedTransformerDecoder

__all__ = [
    "HungarianMatcher",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "Mask2FormerCriterion",
    "Mask2FormerHead",
    "MaskedTransformerDecoder",
    "SimpleFeaturePyramid",
    "average_num_masks",
    "semantic_to_targets",
]
