"""Heads: plain ``nn.Module``s with ``forward(features, image_size)``, ``loss(outputs, targets)`` and ``predict``."""

from .detr import DETRHead, PlainDETRHead
from .dpt import DPTHead
from .linear import LinearClassifier, LinearSegHead
from .mask2former import Mask2FormerHead

__all__ = ["DETRHead", "DPTHead", "LinearClassifier", "LinearSegHead", "Mask2FormerHead", "PlainDETRHead"]
