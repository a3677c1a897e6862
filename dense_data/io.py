"""Reading images and label maps with errors that name the file."""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class CorruptFileError(RuntimeError):
    """An image or label file that exists but cannot be decoded."""


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError as err:
        raise FileNotFoundError(f"missing file: {path}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptFileError(f"cannot decode {path}: {err}") from err


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image (grayscale, RGBA: alpha dropped, palette, 16-bit: scaled) as ``(H, W, 3)`` uint8 RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0, 0, 255).astype(np.uint8))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB."""
    return to_rgb_uint8(_open(Path(path)))


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG as ``(H, W)`` int64, without any colour conversion."""
    path = Path(path)
    image = _open(path)
    if image.mode not in ("L", "P", "I", "I;16"):
        raise CorruptFileError(f"{path}: a label map must be single-channel (mode L, P or I), got mode {image.mode}")
    return np.asarray(image).astype(np.int64)


def require_dir(path: str | Path, layout: str) -> Path:
    """Fail at start-up with the path and the expected layout when a dataset folder is missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}\nexpected layout:\n{layout}")
    return path
