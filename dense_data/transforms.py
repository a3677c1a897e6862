"""albumentations pipelines applied jointly to image, mask, depth and boxes, and the move to tensors."""

import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TARGETS = ("mask", "depth", "boxes", "label")
IGNORE_INDEX = 255
VALID = "valid"  # an extra mask target of detection pipelines: 1 on image pixels, 0 on padding


def _compose(steps: list, targets: tuple[str, ...]) -> A.Compose:
    bbox = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_area=1.0, clip=True) \
        if "boxes" in targets else None
    extra = {"depth": "mask"} if "depth" in targets else {}
    if "boxes" in targets:
        extra[VALID] = "mask"  # where the image is after padding (detection: the padding mask)
    return A.Compose(steps, bbox_params=bbox, additional_targets=extra or None)


def _frame_crop(box: tuple[int, int, int, int], frame: tuple[int, int] = (640, 480)) -> A.Lambda:
    """Cut ``box`` (x1, y1, x2, y2 in a ``frame`` of (width, height)) scaled to the image's size, flooring each bound."""
    def crop(array: np.ndarray, **_) -> np.ndarray:
        height, width = array.shape[:2]
        x1, x2 = (int(x * width / frame[0]) for x in (box[0], box[2]))
        y1, y2 = (int(y * height / frame[1]) for y in (box[1], box[3]))
        return array[y1:y2, x1:x2]

    return A.Lambda(image=crop, mask=crop, name="frame_crop")


def train_transform(targets: tuple[str, ...], crop_size: int | tuple[int, int] = 512, base_size: int | None = None,
                    scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True,
                    photometric: bool = True, fixed_crop: tuple[int, int, int, int] | None = None,
                    rotate: float = 0.0) -> A.Compose:
    """[Fixed crop,] random short-side resize to ``base_size x [scale_range]``, [rotation,] pad, random crop, flip,
    colour jitter.

    ``fixed_crop``: an ``(x1, y1, x2, y2)`` box in pixels of a 640x480 frame, scaled to each image's size (as Meta
    does) and cut from it first (Meta's NYU training crop: ``(43, 45, 608, 472)``). ``rotate``: with probability 0.5, a rotation by a uniform angle in
    ``[-rotate, rotate]`` degrees (Meta's NYU recipe: 2.5), labels resampled nearest. Padding and the corners the
    rotation uncovers fill the image with 0 and the label with 255 (ignore) for masks, 0 (invalid) for depth.

    With ``boxes``, the flip comes before the padding, so that the image stays in the top-left corner of the crop
    and the padding bottom/right (``meta["valid_size"]``, see :class:`Transformed`), as in a DETR batch.
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    base = base_size or min(crop_h, crop_w)
    sizes = sorted({max(8, int(round(base * s))) for s in np.linspace(scale_range[0], scale_range[1], 16)})
    fill_label = IGNORE_INDEX if "mask" in targets else 0
    steps = [_frame_crop(fixed_crop)] if fixed_crop else []
    steps.append(A.SmallestMaxSize(max_size=sizes))
    if rotate:
        steps.append(A.Rotate(limit=(-rotate, rotate), interpolation=cv2.INTER_LINEAR,
                              mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0,
                              fill_mask=fill_label, p=0.5))
    flip_first = flip and "boxes" in targets
    if flip_first:
        steps.append(A.HorizontalFlip(p=0.5))
    steps += [
        A.PadIfNeeded(crop_h, crop_w, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                      fill_mask=fill_label),
        A.RandomCrop(crop_h, crop_w),
    ]
    if flip and not flip_first:
        steps.append(A.HorizontalFlip(p=0.5))
    if photometric:
        steps.append(A.ColorJitter(brightness=0.125, contrast=0.25, saturation=0.25, hue=0.03, p=0.8))
    return _compose(steps, targets)


def eval_transform(short_side: int | None = None, center_crop: int | None = None) -> A.Compose:
    """Optionally resize the image's short side (and center-crop, for classification).

    Used with ``Transformed(resize_labels=False)``: labels keep their original size for scoring.
    """
    steps = [A.SmallestMaxSize(max_size=short_side)] if short_side else []
    if center_crop:
        steps.append(A.CenterCrop(center_crop, center_crop))
    return A.Compose(steps)


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB to a normalized ``(3, H, W)`` float tensor."""
    tensor = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class Transformed(Dataset):
    """Applies a pipeline to a raw dataset and returns tensors for the task's ``targets``.

    In training every target goes through the joint pipeline. In evaluation (``resize_labels=False``) only
    the image is resized; masks and depth keep their file resolution and boxes their pixel coordinates, so
    metrics are computed at the original size. ``meta["image_size"]`` records the network input size.
    ``meta["valid_size"]`` is the ``(h, w)`` of the image in the top-left corner of that input, the rest being
    padding: the whole input in evaluation; in training with ``boxes`` (whose pipelines pad bottom/right and track
    the padding, see :func:`train_transform`) the extent of the image inside the crop; absent otherwise.
    An index may be ``(index, seed)`` (``dense_data.sampling.ResumableSampler``): the pipeline's random draws then
    come from that seed alone, so a sample's augmentation does not depend on the worker or the order of loading.
    """

    def __init__(self, dataset: Dataset, transform: A.Compose, targets: tuple[str, ...], resize_labels: bool = True):
        unknown = set(targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}; valid: {TARGETS}")
        self.dataset, self.transform, self.targets, self.resize_labels = dataset, transform, tuple(targets), resize_labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):
            index, seed = index
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        raw = self.dataset[index]
        missing = [t for t in self.targets if t not in raw and not (t == "boxes" and "labels" in raw)]
        if missing:
            raise KeyError(f"sample {raw.get('meta', {}).get('file', index)} has no {missing} "
                           f"(it has {sorted(raw)}); does this dataset fit the task?")
        inputs = {"image": raw["image"]}
        if self.resize_labels:
            if "mask" in self.targets:
                inputs["mask"] = raw["mask"].astype(np.int32)
            if "depth" in self.targets:
                inputs["depth"] = raw["depth"].astype(np.float32)
            if "boxes" in self.targets:
                inputs["bboxes"] = raw["boxes"].reshape(-1, 4)
                inputs["labels"] = raw["labels"]
                inputs[VALID] = np.ones(raw["image"].shape[:2], np.uint8)
        out = self.transform(**inputs)
        sample = {"image": normalize(out["image"])}
        meta = dict(raw.get("meta", {}))
        meta["image_size"] = tuple(sample["image"].shape[-2:])
        if not self.resize_labels:
            meta["valid_size"] = meta["image_size"]
        elif VALID in inputs and np.shape(out[VALID]) == meta["image_size"]:  # a pipeline that tracks padding
            meta["valid_size"] = _extent(out[VALID])
        source = out if self.resize_labels else {"mask": raw.get("mask"), "depth": raw.get("depth"),
                                                  "bboxes": raw.get("boxes"), "labels": raw.get("labels")}
        if "mask" in self.targets:
            sample["mask"] = torch.as_tensor(np.asarray(source["mask"]), dtype=torch.long)
        if "depth" in self.targets:
            sample["depth"] = torch.as_tensor(np.asarray(source["depth"]), dtype=torch.float32)
        if "boxes" in self.targets:
            sample["boxes"] = torch.as_tensor(np.asarray(source["bboxes"], dtype=np.float32).reshape(-1, 4))
            sample["labels"] = torch.as_tensor(np.asarray(source["labels"]), dtype=torch.long).reshape(-1)
        if "label" in self.targets:
            sample["label"] = torch.tensor(int(raw["label"]), dtype=torch.long)
        sample["meta"] = meta
        return sample


def _extent(valid: np.ndarray) -> tuple[int, int]:
    """``(h, w)`` up to the last row and column holding an image pixel (the image is top-left)."""
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    return (int(rows[-1]) + 1 if rows.size else 0, int(cols[-1]) + 1 if cols.size else 0)


def collate(samples: list[dict]) -> dict:
    """Batch samples of possibly different sizes.

    Images are padded bottom/right with 0 to the largest size, masks with 255 and depth with 0; boxes and
    labels stay lists; ``meta`` is a list of dicts.
    """
    batch = {"meta": [s["meta"] for s in samples]}
    pads = {"image": 0.0, "mask": IGNORE_INDEX, "depth": 0.0}
    for key, fill in pads.items():
        if key in samples[0]:
            tensors = [s[key] for s in samples]
            height = max(t.shape[-2] for t in tensors)
            width = max(t.shape[-1] for t in tensors)
            out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], height, width), fill)
            for i, t in enumerate(tensors):
                out[i, ..., : t.shape[-2], : t.shape[-1]] = t
            batch[key] = out
    for key in ("boxes", "labels"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    if "label" in samples[0]:
        batch["label"] = torch.stack([s["label"] for s in samples])
    return batch
