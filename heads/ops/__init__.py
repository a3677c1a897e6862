"""Building blocks shared by several heads."""

from .distributed import average_over_processes
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from .pyramid import PYRAMID_STRIDES, SimpleFeaturePyramid, group_norm

__all__ = ["MSDeformAttn", "PYRAMID_STRIDES", "SimpleFeaturePyramid", "average_over_processes", "group_norm",
           "ms_deform_attn_core"]
