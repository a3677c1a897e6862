"""Mask2Former semantic-segmentation head (masked-attention mask transformer) for backbone ``Features``."""

from .adapter import ViTAdapter
from .criterion import Mask2FormerCriterion, semantic_to_targets
from .head import Mask2FormerHead
from .matcher import HungarianMatcher
from .pixel_decoder import MSDeformAttnPixelDecoder
from ..ops.pyramid import SimpleFeaturePyramid
from .transformer_decoder import MaskedTransformerDecoder

__all__ = [
    "HungarianMatcher",
    "MSDeformAttnPixelDecoder",
    "Mask2FormerCriterion",
    "Mask2FormerHead",
    "MaskedTransformerDecoder",
    "SimpleFeaturePyramid",
    "ViTAdapter",
    "semantic_to_targets",
]
