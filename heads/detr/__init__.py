"""DETR-style detection heads (two-stage deformable DETR; Meta's Plain-DETR), Hungarian matcher and set losses."""

from .criterion import SetCriterion
from .head import DETRHead
from .matcher import HungarianMatcher
from .plain_detr import PlainDETRHead

__all__ = ["DETRHead", "HungarianMatcher", "PlainDETRHead", "SetCriterion"]
