"""Generic folder datasets: ImageNet-style class folders and image + mask folders."""

from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .io import read_label, read_rgb, require_dir

CLASS_FOLDER_LAYOUT = "  <root>/<split>/<class name>/<image>   (e.g. <root>/train/n01440764/x.JPEG)"
MASK_FOLDER_LAYOUT = "  <image_dir>/<name>.<jpg|png>\n  <mask_dir>/<name>.png   (single-channel class ids)"


class ClassFolders(Dataset):
    """Images in one folder per class (ImageNet layout); classes are the sorted folder names."""

    def __init__(self, root: str | Path, split: str = "train"):
        folder = require_dir(Path(root) / split, CLASS_FOLDER_LAYOUT)
        self.class_names, class_to_idx = find_classes(str(folder))
        self.samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        if not self.samples:
            raise FileNotFoundError(f"no images under {folder}\nexpected layout:\n{CLASS_FOLDER_LAYOUT}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        image = read_rgb(path)
        return {"image": image, "label": label, "meta": {"id": index, "file": path, "orig_size": image.shape[:2]}}


class ImageMaskFolders(Dataset):
    """Pairs ``image_dir/<name>.*`` with ``mask_dir/<name>.png``.

    Args:
        reduce_zero_label: labels are stored with 0 = ignore and classes from 1 (ADE-style): shift them to 0..K-1.
        num_classes: labels at or above it (other than 255) raise an error naming the file.
    """

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, num_classes: int, reduce_zero_label: bool = False):
        image_dir = require_dir(image_dir, MASK_FOLDER_LAYOUT)
        mask_dir = require_dir(mask_dir, MASK_FOLDER_LAYOUT)
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not self.images:
            raise FileNotFoundError(f"no images in {image_dir}\nexpected layout:\n{MASK_FOLDER_LAYOUT}")
        self.masks = [mask_dir / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.masks if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} mask(s) missing in {mask_dir}, e.g. {missing[0]}")
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = read_rgb(self.images[index])
        mask = read_label(self.masks[index])
        if self.reduce_zero_label:
            ignore = mask == 0
            mask = mask - 1
            mask[ignore] = 255
        bad = (mask >= self.num_classes) & (mask != 255)
        if bad.any():
            raise ValueError(f"{self.masks[index]}: label {int(mask[bad].max())} out of range "
                             f"0..{self.num_classes - 1} (255 = ignore)")
        return {"image": image, "mask": mask,
                "meta": {"id": index, "file": str(self.images[index]), "orig_size": image.shape[:2]}}
