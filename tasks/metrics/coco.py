"""COCO box AP through pycocotools ``COCOeval`` as a torchmetrics ``Metric``.

Detections are kept as rows ``[image_id, x, y, w, h, score, category_id]`` (float64) in a list state that
torchmetrics concatenates across processes (``dist_reduce_fx="cat"``), so ``compute()`` on every rank evaluates
all images. Images repeated by a distributed sampler's padding are evaluated once.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def load_coco(coco_gt: COCO | str | Path) -> COCO:
    """A ``COCO`` object from itself or a JSON path (quietly)."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    path = Path(coco_gt)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def results_coco(coco_gt: COCO, detections: list[dict]) -> COCO:
    """Result ``COCO`` object as ``coco_gt.loadRes`` builds it, also for an empty detection list."""
    if detections:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(detections)
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_box_ap(coco_gt: COCO, detections: list[dict], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Run ``COCOeval`` (bbox) and return ``AP, AP50, AP75, APs, APm, APl``.

    Args:
        coco_gt: ground truth.
        detections: COCO result dicts ``{image_id, category_id, bbox: [x, y, w, h], score}``.
        image_ids: images to evaluate (default: all of ``coco_gt``).

    Returns:
        floats in ``[0, 1]``, or ``-1.0`` where COCOeval has nothing to average (e.g. no ground truth boxes).
    """
    coco_dt = results_coco(coco_gt, detections)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats[:6])}


class COCOEvaluator(Metric):
    """COCO box AP of detections in original-image pixels.

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` or the path of an instances JSON.
        cat_ids: COCO category id of each contiguous label (default: sorted ids of ``coco_gt``).
        topk: detections kept per image, the highest scores (``None``: all that ``update`` receives). ``COCOeval``
            itself keeps at most 100 per image *and category*, so keeping more per image (Meta's detector: 1500)
            can raise AP.

    ``update(image_ids, predictions)``: ``image_ids`` ``B`` COCO image ids; ``predictions`` ``B`` dicts with
    ``boxes (k, 4)`` xyxy in original pixels, ``scores (k,)``, ``labels (k,)`` contiguous. ``compute()`` returns
    ``AP, AP50, AP75, APs, APm, APl`` (``-1.0`` where undefined). Images updated without detections count, so
    their ground truth boxes are misses.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, coco_gt: COCO | str | Path, cat_ids: Sequence[int] | None = None, topk: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be a positive number of detections per image or None, got {topk}")
        self.topk = topk
        self.coco_gt = load_coco(coco_gt)
        self.cat_ids = list(cat_ids) if cat_ids is not None else sorted(self.coco_gt.getCatIds())
        self.add_state("detections", default=[], dist_reduce_fx="cat")
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")

    def update(self, image_ids: Sequence[int] | Tensor, predictions: Sequence[dict]) -> None:
        cat = torch.as_tensor(self.cat_ids, dtype=torch.float64)
        ids = [int(i) for i in image_ids]
        for image_id, pred in zip(ids, predictions):
            boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
            scores = torch.as_tensor(pred["scores"]).detach().to("cpu", torch.float64).reshape(-1, 1)
            labels = torch.as_tensor(pred["labels"]).detach().to("cpu", torch.int64).reshape(-1)
            if self.topk is not None and len(scores) > self.topk:
                keep = scores[:, 0].topk(self.topk).indices
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
            rows = torch.cat(
                [torch.full((len(boxes), 1), float(image_id), dtype=torch.float64), xywh, scores, cat[labels][:, None]],
                1,
            )
            self.detections.append(rows.to(self.device))
        self.image_ids.append(torch.as_tensor(ids, dtype=torch.int64, device=self.device))

    def compute(self) -> dict[str, float]:
        ids = dim_zero_cat(self.image_ids).cpu() if len(self.image_ids) else torch.zeros(0, dtype=torch.int64)
        rows = dim_zero_cat(self.detections).cpu() if len(self.detections) else torch.zeros(0, 7, dtype=torch.float64)
        rows = rows.reshape(-1, 7)
        uniq, counts = ids.unique(return_counts=True)
        repeated = uniq[counts > 1]
        if len(repeated):  # a distributed sampler padded the dataset: keep one copy of each repeated image's rows
            dup = torch.isin(rows[:, 0].long(), repeated)
            rows = torch.cat([rows[~dup], rows[dup].unique(dim=0)])
        detections = [
            {"image_id": int(r[0]), "bbox": [float(v) for v in r[1:5]], "score": float(r[5]), "category_id": int(r[6])}
            for r in rows.numpy().astype(np.float64)
        ]
        image_ids = uniq.tolist() if len(uniq) else None
        return coco_box_ap(self.coco_gt, detections, image_ids)
