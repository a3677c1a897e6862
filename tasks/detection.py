"""Object detection: any head whose ``predict`` gives boxes, scores and labels per image (e.g. ``heads.DETRHead``)."""

from collections.abc import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.ops import batched_nms

from backbones.features import Features
from dense_data.coco import COCODetection
from dense_data.coco_gt import coco_from_dataset, sample_key
from heads.detr.padding_mask import padding_mask

from .base import DenseTask
from .metrics.coco import STAT_NAMES, COCOEvaluator
from .visualize import denormalize, palette, save_panels

GT_COLOUR = (255, 255, 255)


def rescale_boxes(boxes: torch.Tensor, input_size: Sequence[int], orig_size: Sequence[int]) -> torch.Tensor:
    """Map ``(k, 4)`` xyxy boxes from the network input to the original image.

    The original ``(h0, w0)`` image was resized to ``input_size = (h1, w1)`` and padded bottom/right, so
    ``x0 = x1 * w0 / w1`` and ``y0 = y1 * h0 / h1``; boxes are clipped to the original image.
    """
    (h1, w1), (h0, w0) = input_size, orig_size
    scale = boxes.new_tensor([w0 / w1, h0 / h1, w0 / w1, h0 / h1])
    limit = boxes.new_tensor([w0, h0, w0, h0])
    return torch.minimum((boxes * scale).clamp(min=0), limit)


def batch_padding_mask(metas: Sequence[dict], padded_size: Sequence[int], device=None) -> torch.Tensor | None:
    """The pixel padding mask ``(B, H, W)`` (``True`` on padding) of a collated batch at the backbone's
    ``padded_size``: each image fills ``meta["valid_size"]`` (else its ``image_size``) in the top-left corner.

    ``None`` when a sample records neither size or every image fills the padded size (nothing to mask).
    """
    sizes = [m.get("valid_size", m.get("image_size")) for m in metas]
    if any(size is None for size in sizes) or all(tuple(size) == tuple(padded_size) for size in sizes):
        return None
    return padding_mask(sizes, padded_size, device)


def draw_boxes(picture: np.ndarray, boxes: np.ndarray, labels: np.ndarray, names: Sequence[str],
               colours: np.ndarray | None = None, scores: np.ndarray | None = None) -> np.ndarray:
    """Draw ``(k, 4)`` xyxy boxes with their class names (and scores) on a copy of an ``(H, W, 3)`` uint8 picture.

    ``colours=None`` draws ground truth: white boxes with a black border; else box ``i`` gets ``colours[labels[i]]``.
    """
    image = Image.fromarray(np.ascontiguousarray(picture))
    draw = ImageDraw.Draw(image)
    for i, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        name = names[label] if 0 <= label < len(names) else str(label)
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        if colours is None:
            draw.rectangle(box, outline=(0, 0, 0), width=3)
            draw.rectangle(box, outline=GT_COLOUR, width=1)
            colour = GT_COLOUR
        else:
            colour = tuple(int(c) for c in colours[label])
            draw.rectangle(box, outline=colour, width=2)
        x, y = box[0] + 2, max(box[1] - 11, 0)
        draw.text((x + 1, y + 1), text, fill=(0, 0, 0))
        draw.text((x, y), text, fill=colour)
    return np.asarray(image)


class DetectionTask(DenseTask):
    """Trains on ``boxes`` + ``labels``; validates with COCO box AP (pycocotools) on the whole val set.

    The ground truth of the evaluator comes from the datamodule's ``val_set``: its own ``coco`` and ``cat_ids``
    when it is a :class:`dense_data.coco.COCODetection`, else an in-memory COCO built once from its samples.
    Predictions are mapped from the network input back to each image's ``orig_size`` before scoring.

    Logs ``val/AP, val/AP50, val/AP75, val/APs, val/APm, val/APl`` (``-1`` where COCOeval has no ground truth
    for a size range).

    Batches of differently sized images (validation: each resized image padded bottom/right to the largest; training:
    images smaller than the crop padded bottom/right to it) carry their padding as ``Features.padding_mask``
    (:func:`batch_padding_mask`), which Meta's Plain-DETR (``heads.detr.PlainDETRHead``) uses as Meta does; other
    heads ignore it.

    Args:
        num_vis: images in the validation picture (image + ground truth | image + predictions per row).
        vis_score_threshold: predictions drawn when their score is at least this, after a class-wise NMS (IoU 0.5,
            for the picture only: AP is computed on all ``predict`` outputs), at most ``vis_max_boxes`` per image.
        vis_min_side: pictures are enlarged so their short side is at least this many pixels.
        eval_topk: detections per image scored by ``COCOeval`` (the highest scores; ``None``: all that the head's
            ``predict`` returns, i.e. its ``topk``).
    """

    targets = ("boxes",)

    def __init__(self, *args, num_vis: int = 4, vis_score_threshold: float = 0.3, vis_max_boxes: int = 20,
                 vis_min_side: int = 256, eval_topk: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_topk = eval_topk
        self.num_vis, self.vis_score_threshold, self.vis_min_side = num_vis, vis_score_threshold, vis_min_side
        self.vis_max_boxes = vis_max_boxes
        self.val_metrics: COCOEvaluator | None = None
        self._image_id_of: dict[Hashable, int] | None = None
        self._vis_rows: list[list[np.ndarray]] = []

    # ------------------------------------------------------------- ground truth
    def set_ground_truth(self, dataset) -> None:
        """Build the COCO evaluator for ``dataset`` (raw samples with boxes/labels, or a ``COCODetection``)."""
        if isinstance(dataset, COCODetection):
            evaluator, self._image_id_of = COCOEvaluator(dataset.coco, dataset.cat_ids, topk=self.eval_topk), None
        else:
            names = self.class_names or [f"class_{i}" for i in range(self.num_classes)]
            coco, self._image_id_of = coco_from_dataset(dataset, names)
            evaluator = COCOEvaluator(coco, list(range(1, len(names) + 1)), topk=self.eval_topk)
        self.val_metrics = evaluator.to(self.device)

    def image_id(self, meta: dict) -> int:
        """The COCO image id of a sample from its ``meta``."""
        if self._image_id_of is None:
            return int(meta["id"])
        key = sample_key(meta)
        if key not in self._image_id_of:
            raise KeyError(f"validation sample {key!r} is not in the ground truth built from the val set")
        return self._image_id_of[key]

    def on_validation_epoch_start(self) -> None:
        if self.val_metrics is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or getattr(datamodule, "val_set", None) is None:
                raise RuntimeError("DetectionTask needs a datamodule with a val_set to build the COCO ground truth")
            self.set_ground_truth(datamodule.val_set)
        self.val_metrics.reset()
        self._vis_rows = []

    # --------------------------------------------------------------- validation
    @torch.no_grad()
    def predict_boxes(self, batch: dict) -> list[dict]:
        """Detections of a collated batch, in each image's original pixels (``boxes`` xyxy, ``scores``, ``labels``)."""
        images = self.pad_to_stride(batch["image"])
        padded_size = tuple(images.shape[-2:])
        outputs = self(images, batch_padding_mask(batch["meta"], padded_size, images.device))
        predictions = self.head.predict(outputs, padded_size)
        return [{**pred, "boxes": rescale_boxes(pred["boxes"].float(), meta["image_size"], meta["orig_size"])}
                for pred, meta in zip(predictions, batch["meta"])]

    def training_features(self, batch: dict) -> Features:
        """The backbone features of a training batch with its padding mask (:func:`batch_padding_mask`)."""
        features = super().training_features(batch)
        if "meta" in batch:
            features.padding_mask = batch_padding_mask(batch["meta"], features.padded_size, features.maps[0].device)
        return features

    def evaluate_batch(self, batch: dict) -> list[dict]:
        """Predict a batch and add it to the evaluator; returns the predictions in original pixels."""
        predictions = self.predict_boxes(batch)
        self.val_metrics.update([self.image_id(m) for m in batch["meta"]], predictions)
        return predictions

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        predictions = self.evaluate_batch(batch)
        if self.vis_dir is None:
            return
        for image, pred, boxes, labels, meta in zip(batch["image"], predictions, batch["boxes"], batch["labels"],
                                                    batch["meta"]):
            if len(self._vis_rows) >= self.num_vis:
                break
            self._vis_rows.append(self.picture(image, meta, boxes, labels, pred))

    def picture(self, image: torch.Tensor, meta: dict, boxes: torch.Tensor, labels: torch.Tensor,
                pred: dict) -> list[np.ndarray]:
        """Two panels at the original size (enlarged to ``vis_min_side``): ground truth | kept predictions."""
        (h1, w1), (h0, w0) = meta["image_size"], meta["orig_size"]
        scale = max(1.0, self.vis_min_side / min(h0, w0))
        size = (round(h0 * scale), round(w0 * scale))
        picture = torch.from_numpy(denormalize(image[:, :h1, :w1])).permute(2, 0, 1)[None].float()
        picture = F.interpolate(picture, size, mode="bilinear", align_corners=False)[0]
        picture = picture.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        keep = batched_nms(pred["boxes"].float(), pred["scores"].float(), pred["labels"], 0.5)
        keep = keep[pred["scores"][keep] >= self.vis_score_threshold][: self.vis_max_boxes]
        gt = draw_boxes(picture, boxes.cpu().numpy().reshape(-1, 4) * scale, labels.cpu().numpy(), names)
        shown = draw_boxes(picture, pred["boxes"][keep].cpu().numpy() * scale, pred["labels"][keep].cpu().numpy(),
                           names, palette(self.num_classes), pred["scores"][keep].cpu().numpy())
        return [gt, shown]

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()  # gathered over processes: the same on every rank
        self.val_metrics.reset()
        for name in STAT_NAMES:
            self.log(f"val/{name}", float(results[name]), prog_bar=name in ("AP", "AP50"), sync_dist=False)
        if self._vis_rows and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            save_panels(self._vis_rows, self.vis_dir / f"val_boxes_step{self.global_step:07d}.png")
        self._vis_rows = []
