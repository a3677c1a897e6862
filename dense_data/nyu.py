"""NYUv2 depth reader in the BTS / BinsFormer file-list layout (also fits KITTI depth lists).

Layout::

    ROOT/
      nyu_train.txt          one sample per line: "<rgb path> <depth path> [focal]"
      nyu_test.txt
      <rgb path>             e.g. kitchen_0028a/rgb_00045.jpg      (paths relative to ROOT; a leading "/" is ignored)
      <depth path>           e.g. kitchen_0028a/sync_depth_00045.png  16-bit PNG, depth * depth_scale, 0 = invalid

Depth PNGs hold ``round(metres * depth_scale)`` as uint16: NYUv2 uses millimetres (``depth_scale=1000``);
KITTI's sparse ground truth uses ``depth_scale=256`` (pass a split file path with ``split_file=``).
Lines whose depth path is ``None`` (BTS's KITTI lists) are skipped. Samples are raw: no tensors, no normalisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .io import CorruptFileError, read_rgb, require_dir

LAYOUT = """  <root>/nyu_train.txt, <root>/nyu_test.txt   one sample a line: '<rgb path> <depth path> [focal]'
  <root>/<rgb path>     RGB image (jpg/png), path relative to <root>
  <root>/<depth path>   16-bit PNG, depth in millimetres (0 = invalid)"""


def _rel(path: str) -> str:
    return path.lstrip("/")


def read_depth_png(path: str | Path, depth_scale: float = 1000.0) -> np.ndarray:
    """``(H, W)`` float32 metres from a 16-bit (or 8/32-bit integer) PNG holding ``metres * depth_scale``.

    A missing file raises FileNotFoundError, an undecodable one :class:`~dense_data.io.CorruptFileError`;
    both name the file.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            raw = np.asarray(im)
    except Exception as err:  # PIL raises several types for corrupt files
        raise CorruptFileError(f"cannot decode {path}: {err}") from err
    if mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
        raise CorruptFileError(f"{path}: a depth map must be a single-channel integer PNG (16-bit), got mode {mode}")
    return (raw.astype(np.float32) / np.float32(depth_scale)).astype(np.float32)


class NYUv2(Dataset):
    """NYUv2 depth samples from a BTS-style file list.

    Args:
        root: dataset folder (see the module docstring for the layout).
        split: "train" or "test" -> ``ROOT/nyu_{split}.txt``.
        depth_scale: integer units per metre in the depth PNGs (1000 for NYU millimetres, 256 for KITTI).
        split_file: optional explicit list file (absolute or relative to ``root``) instead of ``nyu_{split}.txt``.

    ``dataset[i]`` -> ``{"image": (H, W, 3) uint8, "depth": (H, W) float32 metres (0 = invalid),
    "meta": {"file", "depth_file", "id", "orig_size", "focal"}}``.
    """

    def __init__(
        self, root: str | Path, split: str = "train", depth_scale: float = 1000.0, split_file: str | Path | None = None
    ):
        self.root = require_dir(root, LAYOUT)
        if split_file is None:
            if split not in ("train", "test"):
                raise ValueError(f"split must be 'train' or 'test', got {split!r}")
            list_path = self.root / f"nyu_{split}.txt"
        else:
            list_path = Path(split_file)
            if not list_path.is_absolute():
                list_path = self.root / list_path
        if not list_path.is_file():
            raise FileNotFoundError(f"NYUv2 split file not found: {list_path}\nexpected layout:\n{LAYOUT}")
        self.split, self.depth_scale, self.list_path = split, float(depth_scale), list_path
        self.samples: list[tuple[str, str, float | None]] = []
        for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{list_path}:{lineno}: expected '<rgb path> <depth path> [focal]', got {line!r}")
            if parts[1] == "None":
                continue
            focal = float(parts[2]) if len(parts) > 2 else None
            self.samples.append((_rel(parts[0]), _rel(parts[1]), focal))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        rgb_rel, depth_rel, focal = self.samples[index]
        image = read_rgb(self.root / rgb_rel)
        depth = read_depth_png(self.root / depth_rel, self.depth_scale)
        if depth.shape != image.shape[:2]:
            raise ValueError(
                f"depth {self.root / depth_rel} has size {depth.shape}, "
                f"image {self.root / rgb_rel} has {image.shape[:2]}"
            )
        return {
            "image": image,
            "depth": depth,
            "meta": {
                "file": str(self.root / rgb_rel),
                "depth_file": str(self.root / depth_rel),
                "id": str(Path(rgb_rel).with_suffix("")),
                "orig_size": image.shape[:2],
                "focal": focal,
            },
        }


def write_nyu_sample(
    root: str | Path,
    rel_rgb: str,
    rel_depth: str,
    image: np.ndarray,
    depth_m: np.ndarray,
    depth_scale: float = 1000.0,
    split: str | None = None,
    focal: float | None = None,
) -> tuple[Path, Path]:
    """Write one sample in the layout :class:`NYUv2` reads; returns ``(rgb path, depth path)``.

    image: ``(H, W, 3)`` uint8 RGB, saved in the format its extension names (``.jpg`` is lossy).
    depth_m: ``(H, W)`` metres; stored as ``round(depth_m * depth_scale)`` in a 16-bit PNG (PIL mode "I;16"),
    with non-finite or ``<= 0`` values as 0 (invalid) and values clipped to 65535.
    With ``split``, the line ``"rel_rgb rel_depth [focal]"`` is appended to ``ROOT/nyu_{split}.txt``.
    """
    from PIL import Image

    root = Path(root)
    image = np.asarray(image)
    depth_m = np.asarray(depth_m, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if depth_m.shape != image.shape[:2]:
        raise ValueError(f"depth shape {depth_m.shape} differs from image {image.shape[:2]}")
    rgb_path, depth_path = root / _rel(rel_rgb), root / _rel(rel_depth)
    rgb_path.parent.mkdir(parents=True, exist_ok=True)
    depth_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(rgb_path)
    valid = np.isfinite(depth_m) & (depth_m > 0)
    units = np.clip(np.round(np.where(valid, depth_m, 0.0) * depth_scale), 0, 65535).astype(np.uint16)
    im = Image.fromarray(units)  # uint16 -> mode "I;16", which PNG stores as 16-bit grayscale
    if im.mode != "I;16":
        raise RuntimeError(f"PIL made mode {im.mode!r} from uint16, expected 'I;16'")
    im.save(depth_path)
    if split is not None:
        line = f"{_rel(rel_rgb)} {_rel(rel_depth)}" + (f" {focal}" if focal is not None else "")
        with open(root / f"nyu_{split}.txt", "a") as f:
            f.write(line + "\n")
    return rgb_path, depth_path
