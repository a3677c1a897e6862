"""ADE20K (SceneParsing, 150 classes) in its release layout."""

from pathlib import Path

from torch.utils.data import Dataset

from .io import read_label, read_rgb, require_dir

LAYOUT = """  <root>/ADEChallengeData2016/images/{training,validation}/*.jpg
  <root>/ADEChallengeData2016/annotations/{training,validation}/*.png   (0 = ignore, classes 1..150)
  (<root> may also be the ADEChallengeData2016 folder itself)"""


# The 150 SceneParsing classes in label order (file label 1 = "wall").
CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path',
    'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase',
    'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel',
    'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane',
    'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
    'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool',
    'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture',
    'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)


class ADE20K(Dataset):
    """ADE20K scene parsing: raw samples with ``mask`` in 0..149, 255 = ignore (label 0 in the files).

    Args:
        root: the folder holding ``ADEChallengeData2016``, or that folder itself.
        split: ``training`` or ``validation`` (``train``/``val`` accepted).
    """

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

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
