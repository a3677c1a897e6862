"""The Lightning module shared by every task: backbone + head, the training step, optimizer, logging."""

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from backbones import build_backbone
from backbones.features import Features

from .loading import build_head as instantiate_head
from .meta_heads import load_head_weights
from .optim import build_optimizer
from .padding import pad_for_head


class DenseTask(L.LightningModule):
    """Pairs a DINOv3 backbone with a head; subclasses add validation metrics and pictures.

    The module is built from plain dicts (the resolved Hydra config), which are saved in every checkpoint,
    so a checkpoint alone rebuilds the model.

    Args:
        backbone: keyword arguments of ``backbones.build_backbone``.
        head: ``{"_target_": "heads.X", ...}``; ``in_channels``, ``strides`` (and ``num_classes`` if the task
            has classes) are filled in from the backbone and the data. ``weights``: a head file to start from
            (one of Meta's released heads, or an exported ``head.safetensors``; see
            ``tasks.meta_heads.load_head_weights``).
        optim: keyword arguments of ``tasks.optim.build_optimizer`` (lr, weight_decay, warmup_steps, ...).
        num_classes, class_names: the label space (None for depth).
        vis_dir: where validation pictures go (None: no pictures).
    """

    targets: tuple[str, ...] = ()

    def __init__(self, backbone: dict, head: dict, optim: dict | None = None, num_classes: int | None = None,
                 class_names: list[str] | None = None, vis_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(**backbone)
        self.head = self.build_head(head, num_classes)
        self.optim = dict(optim or {})
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else None
        self.vis_dir = Path(vis_dir) if vis_dir else None

    # ----------------------------------------------------------------- model
    def build_head(self, head: dict, num_classes: int | None) -> torch.nn.Module:
        """The head from its config, ``in_channels`` / ``strides`` from the backbone, started from ``head.weights``
        when given (a sweep builds several)."""
        module = instantiate_head(head, self.backbone.channels, self.backbone.strides, num_classes)
        if head.get("weights"):
            load_head_weights(module, head, head["weights"], self.hparams["backbone"]["name"],
                              self.backbone.out_indices, num_classes,
                              {"windows": getattr(self.backbone, "windows", 0)})
        return module

    def pad_to_stride(self, images: torch.Tensor) -> torch.Tensor:
        """Pad ``(B, 3, H, W)`` bottom/right with zeros to a multiple of the backbone stride."""
        multiple = self.backbone.pad_to
        pad_h, pad_w = (-images.shape[-2]) % multiple, (-images.shape[-1]) % multiple
        return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Raw head outputs for ``(B, 3, H, W)`` images whose sides are multiples of the backbone stride.

        ``padding_mask``: ``(B, H, W)`` bool, ``True`` on padding (a batch of differently sized images), set as
        ``Features.padding_mask`` for the heads that read it (DETR); None: no padding.
        """
        features = self.backbone(images)
        features.padding_mask = padding_mask
        return self.head(features, features.padded_size)

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """Dense prediction ``(B, C, H, W)`` at the input size (class scores or depth).

        The backbone pads the input to its stride (or the head asks for centre padding, see
        ``tasks.padding``); the padding is cut from the prediction.
        """
        height, width = images.shape[-2:]
        images, (top, left) = pad_for_head(images, self.backbone.pad_to, self.head)
        features = self.backbone(images)
        prediction = self.head.predict(self.head(features, features.padded_size), features.padded_size)
        return prediction[..., top:top + height, left:left + width]

    @staticmethod
    def network_images(batch: dict) -> list[torch.Tensor]:
        """Each image of a collated batch without the collate padding: ``(3, h_i, w_i)`` at network size."""
        return [image[:, :h, :w] for image, (h, w) in zip(batch["image"], (m["image_size"] for m in batch["meta"]))]

    # -------------------------------------------------------------- training
    def batch_targets(self, batch: dict, image_size: tuple[int, int]) -> dict:
        """The head's targets from a batch, padded like the images (masks with 255, depth with 0)."""
        targets = {}
        for key in self.targets:
            value = batch[key]
            if key in ("mask", "depth"):
                pad_h, pad_w = image_size[0] - value.shape[-2], image_size[1] - value.shape[-1]
                value = F.pad(value, (0, pad_w, 0, pad_h), value=255 if key == "mask" else 0)
            targets[key] = value
        if "boxes" in self.targets:
            targets["labels"] = batch["labels"]
        return targets

    def training_features(self, batch: dict) -> Features:
        """The backbone features of a training batch: read from the frozen-feature cache when the batch carries
        them (``dense_data.feature_cache``), else computed from its images."""
        cached = batch.get("features")
        if cached is None:
            return self.backbone(self.pad_to_stride(batch["image"]))
        return Features(maps=cached["maps"], cls=cached.get("cls"), strides=self.backbone.strides,
                        channels=self.backbone.channels, patch_size=self.backbone.patch_size,
                        padded_size=tuple(batch["meta"][0]["padded_size"]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = self.training_features(batch)
        outputs = self.head(features, features.padded_size)
        losses = self.head.loss(outputs, self.batch_targets(batch, features.padded_size))
        total = sum(losses.values())
        if not torch.isfinite(total):
            bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v)}
            files = [m.get("file") for m in batch.get("meta", [])]
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: {bad}; batch files: {files}. "
                                     "Lower optim.lr, check the labels, or use trainer.gradient_clip_val.")
        batch_size = len(batch["meta"]) if "meta" in batch else len(batch["image"])  # cached batches have no image
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return total

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the task class; leave out backbone weights that training did not change when they can be
        re-read from ``backbone.weights`` (a random-init backbone is always kept)."""
        checkpoint["task_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if not self.hparams.backbone.get("weights"):
            return
        trained = {f"backbone.{n}" for n, p in self.backbone.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.") and k not in trained]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Fill the backbone weights left out of the checkpoint from the freshly built backbone."""
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("backbone.") and key not in state:
                state[key] = value

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else self.optim.get("warmup_steps", 0) + 1
        return build_optimizer(self.head, self.backbone, total, **self.optim)
