"""Pictures of predictions: colour palettes and side-by-side panels saved as PNG."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dense_data.transforms import IMAGENET_MEAN, IMAGENET_STD


def palette(num_classes: int, seed: int = 3) -> np.ndarray:
    """``(num_classes + 1, 3)`` uint8 colours; the extra last row (grey) is for ignored pixels."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(num_classes, 3)).astype(np.uint8)
    return np.concatenate([colours, np.array([[60, 60, 60]], dtype=np.uint8)])


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalized ``(3, H, W)`` tensor back to ``(H, W, 3)`` uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    array = (image.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return (array * 255).round().astype(np.uint8)


def resize_picture(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` uint8 resized (nearest) to ``size``, to sit beside labels of that size."""
    if picture.shape[:2] == tuple(size):
        return picture
    return np.asarray(Image.fromarray(picture).resize((size[1], size[0]), Image.NEAREST))


def colorize_labels(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` class ids to ``(H, W, 3)`` colours; ``ignore_index`` is grey."""
    colours = palette(num_classes)
    index = np.where(labels == ignore_index, num_classes, np.clip(labels, 0, num_classes - 1))
    return colours[index]


def save_panels(rows: list[list[np.ndarray]], path: str | Path) -> Path:
    """Save rows of same-height ``(H, W, 3)`` uint8 panels as one PNG (rows are padded to the widest)."""
    lines = [np.concatenate(row, axis=1) for row in rows]
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0))) for line in lines]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(lines, axis=0)).save(path)
    return path
