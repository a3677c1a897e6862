"""Heads: plain ``nn.Module``s with ``forward(features, image_size)``, ``loss(outputs, targets)`` and ``predict``."""

from .linear import LinearClassifier, LinearSegHead

__all__ = ["LinearClassifier", "LinearSegHead"]
