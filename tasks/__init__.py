"""Lightning tasks pairing a backbone with a head, its loss and its metrics; inference helpers."""

from .base import DenseTask
from .classification import ClassificationTask
from .depth import DepthTask
from .detection import DetectionTask
from .loading import load_predictor
from .segmentation import SegmentationTask

__all__ = ["ClassificationTask", "DenseTask", "DepthTask", "DetectionTask", "SegmentationTask", "load_predictor"]
