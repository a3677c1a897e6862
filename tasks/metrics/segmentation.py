"""Semantic segmentation metrics accumulated over the whole dataset."""

import torch
from torchmetrics.classification import MulticlassConfusionMatrix


class SegmentationMetrics(MulticlassConfusionMatrix):
    """Dataset-level mIoU and pixel accuracy from one confusion matrix (summed across processes).

    IoU of class ``c`` is ``TP / (TP + FP + FN)``; classes absent from both ground truth and predictions
    (union 0) are NaN and left out of the mean (mmseg's ``nanmean``). Pixels labelled ``ignore_index`` count nowhere.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__(num_classes=num_classes, ignore_index=ignore_index)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``: label map ``(B, H, W)`` or scores ``(B, K, H, W)``; ``target``: ``(B, H, W)``."""
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        super().update(preds.reshape(-1), target.reshape(-1))

    def compute(self) -> dict[str, torch.Tensor]:
        matrix = super().compute().double()
        tp = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - tp
        iou = tp / union  # NaN where union == 0
        total = matrix.sum()
        return {"mIoU": iou.nanmean().float(),
                "acc": (tp.sum() / total).float() if total > 0 else torch.tensor(float("nan")),
                "IoU_per_class": iou.float()}
