"""Image classification with a linear probe: top-1 / top-5 accuracy."""

import torch
from torchmetrics.classification import MulticlassAccuracy

from .base import DenseTask


class ClassificationTask(DenseTask):
    """Trains on the image ``label``; validates top-1 and top-5 (top-k capped at the number of classes)."""

    targets = ("label",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(self.num_classes, top_k=min(5, self.num_classes), average="micro")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.pad_to_stride(batch["image"])
        logits = self.head.predict(self(images), tuple(images.shape[-2:]))
        self.top1.update(logits, batch["label"])
        self.top5.update(logits, batch["label"])

    def on_validation_epoch_end(self) -> None:
        self.log("val/top1", self.top1.compute(), prog_bar=True)
        self.log("val/top5", self.top5.compute())
        self.top1.reset()
        self.top5.reset()
