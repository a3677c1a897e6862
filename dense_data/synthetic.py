"""A synthetic scene generator: textured backgrounds with shapes of several classes.

Each scene has a semantic mask, per-pixel depth, instance boxes and labels, and an image class, all
deterministic by ``(seed, index)``. Object classes are told apart by colour, texture and shape; depth is
seen through atmospheric fog (far things fade to the fog colour) and the ground plane. ``write_*``
functions save scenes in the layouts of the real datasets so the real readers are tested on them.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "cross")
OBJECT_NAMES = CLASS_NAMES[1:]
_PALETTE = np.array([(220, 50, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30), (180, 50, 200)], dtype=np.float32)
FOG_COLOUR = np.array([200, 205, 215], dtype=np.float32)
FOG_DISTANCE = 6.0
MIN_DEPTH, MAX_DEPTH = 1.0, 9.0


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == 0:  # disc
        return dy ** 2 + dx ** 2 <= r ** 2
    if kind == 1:  # square
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == 2:  # triangle, apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == 3:  # ring
        d2 = dy ** 2 + dx ** 2
        return (d2 <= r ** 2) & (d2 >= (0.5 * r) ** 2)
    return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))  # cross


def make_scene(index: int, size: tuple[int, int] = (128, 128), seed: int = 0, max_objects: int = 4) -> dict:
    """Render scene ``index``: a raw sample dict (``image``, ``mask``, ``depth``, ``boxes``, ``labels``, ``label``)."""
    height, width = size
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    # Ground plane: far at the top, near at the bottom, with a low-saturation striped texture.
    horizon = rng.uniform(0.6, 0.9) * MAX_DEPTH
    depth = horizon - (horizon - 3.0) * (yy / max(height - 1, 1))
    grey = rng.uniform(90, 150)
    tint = rng.uniform(-12, 12, size=3)
    freq, angle = rng.uniform(0.05, 0.2), rng.uniform(0, np.pi)
    stripes = 12 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    colour = grey + tint[None, None, :] + stripes[..., None]
    mask = np.zeros((height, width), dtype=np.int64)
    instance = np.full((height, width), -1, dtype=np.int64)

    num = int(rng.integers(1, max_objects + 1))
    kinds = rng.integers(0, len(OBJECT_NAMES), size=num)
    depths = np.sort(rng.uniform(MIN_DEPTH + 0.5, 5.0, size=num))[::-1]  # paint far to near
    for i, (kind, d) in enumerate(zip(kinds, depths)):
        r = rng.uniform(0.22, 0.4) * min(height, width) * (2.0 / d) ** 0.5
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.15, 0.85) * width
        region = _shape_mask(int(kind), yy, xx, cy, cx, r)
        base = _PALETTE[kind] + rng.uniform(-20, 20, size=3)
        pattern = 18 * np.sign(np.sin((xx + yy * (kind % 2)) * (0.3 + 0.1 * kind)))
        colour[region] = base + pattern[region][:, None]
        depth[region] = d
        mask[region] = kind + 1
        instance[region] = i

    fog = 1.0 - np.exp(-depth / FOG_DISTANCE)
    image = colour * (1 - fog[..., None]) + FOG_COLOUR * fog[..., None]
    image = image + rng.normal(0, 4, size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    boxes, labels, areas = [], [], []
    for i, kind in enumerate(kinds):
        ys, xs = np.nonzero(instance == i)
        if len(ys) < 20:
            continue
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(int(kind))
        areas.append(len(ys))
    return {
        "image": image,
        "mask": mask,
        "depth": depth.astype(np.float32),
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.array(labels, dtype=np.int64),
        "label": labels[int(np.argmax(areas))] if labels else 0,
        "meta": {"id": index, "file": f"synthetic_{seed}_{index:06d}", "orig_size": (height, width)},
    }


class SyntheticScenes(Dataset):
    """``num_images`` scenes of ``size`` rendered on the fly (raw sample dicts)."""

    class_names = CLASS_NAMES

    def __init__(self, num_images: int = 64, size: tuple[int, int] = (128, 128), seed: int = 0, max_objects: int = 4):
        self.num_images, self.size, self.seed, self.max_objects = num_images, tuple(size), seed, max_objects

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        return make_scene(index, self.size, self.seed, self.max_objects)


def _scenes(num: int, size, seed: int):
    return (make_scene(i, size, seed) for i in range(num))


def write_ade20k(root: str | Path, num_train: int = 16, num_val: int = 8, size=(128, 128), seed: int = 0) -> Path:
    """Write scenes in the ADE20K layout (``ADEChallengeData2016/images|annotations/training|validation``).

    Labels are stored ADE-style: 0 = ignore, class ``c`` as ``c + 1``. Returns the dataset folder.
    """
    base = Path(root) / "ADEChallengeData2016"
    for split, num, split_seed in (("training", num_train, seed), ("validation", num_val, seed + 1)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(_scenes(num, size, split_seed)):
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            Image.fromarray(scene["image"]).save(base / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray((scene["mask"] + 1).astype(np.uint8)).save(base / "annotations" / split / f"{name}.png")
    return base


def write_class_folders(root: str | Path, num_train: int = 20, num_val: int = 10, size=(64, 64), seed: int = 0) -> Path:
    """Write scenes as ImageNet-style class folders ``root/{train,val}/<class name>/<file>.png``."""
    root = Path(root)
    for split, num, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        for name in OBJECT_NAMES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(_scenes(num, size, split_seed)):
            Image.fromarray(scene["image"]).save(root / split / OBJECT_NAMES[scene["label"]] / f"{i:06d}.png")
    return root
