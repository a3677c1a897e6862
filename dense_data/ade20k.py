"""ADE20K (SceneParsing, 150 classes) in its release layout."""

from pathlib import Path

from torch.utils.data import Dataset

from .io import read_label, read_rgb, require_dir

LAYOUT = """  <root>/ADEChallengeData2016/images/{training,validation}/*.jpg
  <root>/ADEChallengeData2016/annotations/{training,validation}/*.png   (0 = ignore, classes 1..150)
  (<root> may also be the ADEChallengeData2016 folder itself)"""


class ADE20K(Dataset):
    """ADE20K scene parsing: raw samples with ``mask`` in 0..149, 255 = ignore (label 0 in the files).

    Args:
        root: the folder holding ``ADEChallengeData2016``, or that folder itself.
        split: ``training`` or ``validation`` (``train``/``val`` accepted).
    """

    num_classes = 150

    def __init__(self, root: str | Path, split: str = "training"):
        split = {"train": "training", "val": "validation"}.get(split, split)
        root = require_dir(root, LAYOUT)
        base = root if (root / "images").is_dir() else root / "ADEChallengeData2016"
        image_dir = require_dir(base / "images" / split, LAYOUT)
        label_dir = require_dir(base / "annotations" / split, LAYOUT)
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.images:
            raise FileNotFoundError(f"no images in {image_dir}\nexpected layout:\n{LAYOUT}")
        self.labels = [label_dir / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.labels if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} annotation(s) missing in {label_dir}, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = read_rgb(self.images[index])
        label = read_label(self.labels[index])
        if label.shape != image.shape[:2]:
            raise ValueError(f"{self.labels[index]}: label size {label.shape} differs from image {image.shape[:2]}")
        if label.max() > self.num_classes:
            raise ValueError(f"{self.labels[index]}: label {label.max()} out of range 0..{self.num_classes}")
        mask = label - 1
        mask[label == 0] = 255
        return {"image": image, "mask": mask,
                "meta": {"id": index, "file": str(self.images[index]), "orig_size": image.shape[:2]}}
