"""segmentation_models_pytorch decoders (FPN, UPerNet, Segformer, DeepLabV3+, DPT) as heads on DINOv3 features."""

from .decoders import DECODERS
from .head import SMPHead

__all__ = ["DECODERS", "SMPHead"]
