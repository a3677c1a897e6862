"""DINOv3 backbones through timm: ``build_backbone(name, weights, out_indices, freeze) -> DinoBackbone``."""

from .dinov3 import DinoBackbone, build_backbone
from .features import Features
from .registry import BACKBONES, get_spec
from .weights import WeightsError

__all__ = ["BACKBONES", "DinoBackbone", "Features", "WeightsError", "build_backbone", "get_spec"]
