"""Heads: plain ``nn.Module``s with ``forward(features, image_size)``, ``loss(outputs, targets)`` and ``predict``."""

from .detr import DETRHead, PlainDETRHead
from .dpt import DPTHead
from .linear import LinearClassifier, LinearSegHead
from .linear_depth import LinearDepthHead
from .mask2former import Mask2FormerHead
from .smp import SMPHead

__all__ = ["DETRHead", "DPTHead", "LinearClassifier", "LinearDepthHead", "LinearSegHead", "Mask2FormerHead",
           "PlainDETRHead", "SMPHead"]
