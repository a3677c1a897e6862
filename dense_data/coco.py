"""COCO-format detection reader (pycocotools) and writer.

Layout::

    <image_dir>/<file_name>            images named by ``images[].file_name`` of the JSON
    <ann_file>                         instances JSON (``images``, ``annotations``, ``categories``)

``write_coco(root, ...)`` writes ``root/images/*.png`` and ``root/annotations/instances.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .io import read_rgb  # raises an error naming the file when an image cannot be decoded

LAYOUT = (
    "expected a COCO layout: an image folder holding the files named by images[].file_name, and an instances "
    "JSON with 'images', 'annotations' (bbox = [x, y, w, h] pixels) and 'categories' "
    "(e.g. train2017/ + annotations/instances_train2017.json)"
)


class COCODetection:
    """COCO detection dataset returning raw samples.

    Category ids are mapped to contiguous labels ``0..K-1`` sorted by id: ``class_names[label]`` is the name and
    ``cat_ids[label]`` the COCO id. Boxes go from ``xywh`` to ``xyxy``; zero-area boxes are dropped, crowd boxes too
    unless ``keep_crowd``. Images without annotations are kept (``N = 0``).

    Args:
        image_dir: folder with the images.
        ann_file: instances JSON.
        keep_crowd: keep ``iscrowd=1`` boxes (off for training).

    Sample: ``image (H, W, 3) uint8``, ``boxes (N, 4) float32 xyxy``, ``labels (N,) int64``,
    ``meta = {"file", "id", "orig_size": (H, W)}``.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, keep_crowd: bool = False):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}; {LAYOUT}")
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}; {LAYOUT}")
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(self.ann_file))
        self.cat_ids: list[int] = sorted(self.coco.getCatIds())
        cats = self.coco.loadCats(self.cat_ids)
        self.class_names: list[str] = [c["name"] for c in cats]
        self.label_of = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.image_ids: list[int] = sorted(self.coco.getImgIds())
        self.keep_crowd = keep_crowd
        self._check_annotations()

    def _check_annotations(self) -> None:
        """Fail at start-up, naming the file, the annotation and the field, on a malformed box or category id."""
        for ann in self.coco.dataset.get("annotations", []):
            where = f"{self.ann_file}: annotation id {ann.get('id')} (image {ann.get('image_id')})"
            box = ann.get("bbox")
            if not (isinstance(box, (list, tuple)) and len(box) == 4
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
                raise ValueError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {box!r}")
            if ann.get("category_id") not in self.label_of:
                raise ValueError(f"{where}: 'category_id' {ann.get('category_id')!r} is not among the categories "
                                 f"{self.cat_ids[:10]}{' ...' if len(self.cat_ids) > 10 else ''}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``boxes (N, 4) float32 xyxy`` and ``labels (N,) int64`` of one image after filtering."""
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        boxes, labels = [], []
        for a in anns:
            if a.get("iscrowd", 0) and not self.keep_crowd:
                continue
            x, y, w, h = a["bbox"]
            if w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[a["category_id"]])
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)

    def __getitem__(self, i: int) -> dict:
        image_id = self.image_ids[i]
        info = self.coco.loadImgs([image_id])[0]
        path = self.image_dir / info["file_name"]
        image = read_rgb(path)
        boxes, labels = self.annotations(image_id)
        return {
            "image": image,
            "boxes": boxes,
            "labels": labels,
            "meta": {"file": str(path), "id": image_id, "orig_size": tuple(image.shape[:2])},
        }


def write_coco(root: str | Path, samples: Sequence[dict], class_names: Sequence[str]) -> tuple[Path, Path]:
    """Write raw samples as a COCO dataset.

    Args:
        root: output folder; images go to ``root/images/NNNNNN.png``, the JSON to ``root/annotations/instances.json``.
        samples: dicts with ``image (H, W, 3) uint8``, ``boxes (N, 4)`` xyxy pixels, ``labels (N,)`` in ``0..K-1``.
        class_names: ``K`` names; category ids are ``1..K``.

    Returns:
        ``(image_dir, ann_file)``.
    """
    root = Path(root)
    image_dir, ann_dir = root / "images", root / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, s in enumerate(samples):
        image = np.asarray(s["image"], dtype=np.uint8)
        name = f"{i + 1:06d}.png"
        Image.fromarray(image).save(image_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": int(image.shape[0]), "width": int(image.shape[1])})
        boxes = np.asarray(s.get("boxes", np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
        for box, label in zip(boxes, np.asarray(s.get("labels", []), dtype=np.int64).reshape(-1)):
            x0, y0, x1, y1 = (float(v) for v in box)
            w, h = x1 - x0, y1 - y0
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": str(n), "supercategory": "object"} for k, n in enumerate(class_names)]
    ann_file = ann_dir / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return image_dir, ann_file
