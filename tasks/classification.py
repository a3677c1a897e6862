"""Image classification with a linear probe: top-1 / top-5 accuracy."""

import numpy as np
from PIL import Image, ImageDraw
from torchmetrics.classification import MulticlassAccuracy

from .base import DenseTask
from .visualize import denormalize, save_panels


def caption(picture: np.ndarray, text: str, correct: bool) -> np.ndarray:
    """Write ``text`` in the top-left corner, green when ``correct``, red otherwise."""
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((2, 2), text)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(80, 230, 80) if correct else (240, 70, 70))
    return np.asarray(image)


class ClassificationTask(DenseTask):
    """Trains on the image ``label``; validates top-1 and top-5 (top-k capped at the number of classes).

    The validation picture shows the first ``num_vis`` images captioned ``ground truth -> prediction``.
    """

    targets = ("label",)

    def __init__(self, *args, num_vis: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(self.num_classes, top_k=min(5, self.num_classes), average="micro")
        self.num_vis = num_vis
        self._vis: list[np.ndarray] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.pad_to_stride(batch["image"])
        logits = self.head.predict(self(images), tuple(images.shape[-2:]))
        self.top1.update(logits, batch["label"])
        self.top5.update(logits, batch["label"])
        if self.vis_dir is None:
            return
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        for image, target, prediction in zip(batch["image"], batch["label"].tolist(), logits.argmax(1).tolist()):
            if len(self._vis) < self.num_vis:
                text = f"{names[target]} -> {names[prediction]}"
                self._vis.append(caption(denormalize(image), text, target == prediction))

    def on_validation_epoch_end(self) -> None:
        self.log("val/top1", self.top1.compute(), prog_bar=True)
        self.log("val/top5", self.top5.compute())
        self.top1.reset()
        self.top5.reset()
        if self._vis and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            rows = [self._vis[i:i + 4] for i in range(0, len(self._vis), 4)]
            save_panels(rows, self.vis_dir / f"val_step{self.global_step:07d}.png")
        self._vis = []
