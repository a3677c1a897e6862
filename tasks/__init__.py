"""Lightning tasks pairing a backbone with a head, its loss and its metrics; inference helpers."""

from .base import DenseTask
from .classification import ClassificationTask
from .segmentation import SegmentationTask
from .predictor import load_predictor

__all__ = ["ClassificationTask", "DenseTask", "SegmentationTask", "load_predictor"]
