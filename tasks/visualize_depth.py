"""Depth visualisation without matplotlib: a small turbo-like colour map and an image | gt | prediction panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Anchor colours of a turbo-like map (dark blue -> blue -> cyan -> green -> yellow -> orange -> red -> dark red),
# placed evenly on [0, 1] and linearly interpolated into a 256-entry table.
_ANCHORS = np.array(
    [
        [48, 18, 59],
        [65, 105, 225],
        [30, 190, 235],
        [40, 230, 150],
        [160, 250, 50],
        [240, 215, 40],
        [250, 130, 20],
        [210, 50, 10],
        [122, 4, 3],
    ],
    dtype=np.float64,
)


def _build_lut(n: int = 256) -> np.ndarray:
    pos = np.linspace(0.0, 1.0, len(_ANCHORS))
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, pos, _ANCHORS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


TURBO_LUT = _build_lut()  # (256, 3) uint8


def colorize_depth(
    depth: np.ndarray, vmin: float | None = None, vmax: float | None = None, invalid_color=(0, 0, 0)
) -> np.ndarray:
    """``(H, W)`` depth -> ``(H, W, 3)`` uint8 RGB; near = blue, far = red.

    Values are mapped linearly from ``[vmin, vmax]`` (default: the valid min/max) to the table and clipped.
    Pixels that are not finite or ``<= 0`` (invalid ground truth) get ``invalid_color``.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"colorize_depth expects an (H, W) array, got shape {depth.shape}")
    valid = np.isfinite(depth) & (depth > 0)
    if vmin is None:
        vmin = float(depth[valid].min()) if valid.any() else 0.0
    if vmax is None:
        vmax = float(depth[valid].max()) if valid.any() else 1.0
    span = max(float(vmax) - float(vmin), 1e-12)
    t = np.clip((np.where(valid, depth, vmin) - vmin) / span, 0.0, 1.0)
    out = TURBO_LUT[np.round(t * (len(TURBO_LUT) - 1)).astype(np.int64)]
    out[~valid] = np.asarray(invalid_color, dtype=np.uint8)
    return out


def depth_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, vmin=None, vmax=None) -> np.ndarray:
    """``image (H, W, 3) uint8 | gt (H, W) | pred (H, W)`` side by side -> ``(H, 3W, 3)`` uint8.

    gt and prediction share one colour scale: by default the range of the valid ground truth.
    """
    gt = np.asarray(gt, dtype=np.float64)
    valid = np.isfinite(gt) & (gt > 0)
    if vmin is None:
        vmin = float(gt[valid].min()) if valid.any() else 0.0
    if vmax is None:
        vmax = float(gt[valid].max()) if valid.any() else 1.0
    image = np.asarray(image)
    if image.shape[:2] != gt.shape or np.asarray(pred).shape != gt.shape:
        raise ValueError(f"shapes differ: image {image.shape}, gt {gt.shape}, pred {np.asarray(pred).shape}")
    return np.concatenate(
        [image.astype(np.uint8), colorize_depth(gt, vmin, vmax), colorize_depth(pred, vmin, vmax)], axis=1
    )


def save_depth_panel(
    path: str | Path, image: np.ndarray, gt: np.ndarray, pred: np.ndarray, vmin=None, vmax=None
) -> Path:
    """Write :func:`depth_panel` as a PNG (PIL) and return its path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(depth_panel(image, gt, pred, vmin, vmax)).save(path)
    return path
