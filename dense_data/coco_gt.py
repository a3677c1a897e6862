"""COCO ground truth for box AP from any dataset of raw samples with ``boxes`` and ``labels``."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Hashable, Sequence

import numpy as np
from pycocotools.coco import COCO


def sample_key(meta: dict, index: int | None = None) -> Hashable:
    """The key that names one sample: ``meta["id"]``, else ``meta["file"]``, else the dataset index."""
    for name in ("id", "file"):
        value = meta.get(name)
        if value is not None:
            return value.item() if hasattr(value, "item") else value
    return index


def coco_from_dataset(dataset: Sequence[dict], class_names: Sequence[str]) -> tuple[COCO, dict[Hashable, int]]:
    """Build an in-memory ``COCO`` ground truth from raw samples (reads every sample once).

    Args:
        dataset: raw samples with ``boxes (N, 4)`` xyxy pixels, ``labels (N,)`` in ``0..K-1`` and ``meta``
            (``orig_size`` (H, W); ``id`` or ``file`` names the sample).
        class_names: ``K`` names; category id of label ``k`` is ``k + 1``.

    Returns:
        ``(coco, image_id_of)``: the ground truth (image ids ``1..len``, annotation ids from 1, as ``COCOeval``
        needs non-zero ids) and the map from :func:`sample_key` to the COCO image id.
    """
    images, anns, image_id_of = [], [], {}
    for index in range(len(dataset)):
        sample = dataset[index]
        meta = sample.get("meta", {})
        height, width = meta.get("orig_size") or sample["image"].shape[:2]
        key = sample_key(meta, index)
        if key in image_id_of:
            raise ValueError(f"two samples of the validation set share the name {key!r} (meta id/file)")
        image_id = index + 1
        image_id_of[key] = image_id
        images.append({"id": image_id, "height": int(height), "width": int(width), "file_name": str(key)})
        boxes = np.asarray(sample.get("boxes", np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(sample.get("labels", []), dtype=np.int64).reshape(-1)
        for (x0, y0, x1, y1), label in zip(boxes, labels):
            w, h = float(x1 - x0), float(y1 - y0)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(label) + 1,
                         "bbox": [float(x0), float(y0), w, h], "area": w * h, "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k + 1, "name": str(n)} for k, n in enumerate(class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, image_id_of
