"""Building blocks shared by several heads."""

from .distributed import average_over_processes
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_core

__all__ = ["MSDeformAttn", "average_over_processes", "ms_deform_attn_core"]
