"""DETR-style detection head: deformable transformer, Hungarian matcher and set losses."""

from .criterion import SetCriterion
from .head import DETRHead
from .matcher import HungarianMatcher

__all__ = ["DETRHead", "HungarianMatcher", "SetCriterion"]
