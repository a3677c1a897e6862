"""Linear probes: an image classifier on class tokens and a per-patch segmentation head."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.features import Features

from .seg_losses import SegLoss


class LinearClassifier(nn.Module):
    """DINOv3's linear probe: ``[CLS of the last n layers, mean patch token of the last layer] -> Linear``.

    ConvNeXt features have no class token: build it with ``use_cls=False`` to read the mean of the last map only.

    Args:
        in_channels: channels of each backbone map; the last ``n_last_blocks`` are read.
        n_last_blocks: how many layers' class tokens to concatenate.
        avgpool: also concatenate the mean patch token of the last layer.
        use_cls: read class tokens (ViT); ``False`` for ConvNeXt.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int, n_last_blocks: int = 1,
                 avgpool: bool = True, use_cls: bool = True):
        super().__init__()
        if not 1 <= n_last_blocks <= len(in_channels):
            raise ValueError(f"n_last_blocks={n_last_blocks} but the backbone gives {len(in_channels)} layers")
        if not (use_cls or avgpool):
            raise ValueError("LinearClassifier needs use_cls or avgpool")
        self.n_last_blocks, self.avgpool, self.use_cls = n_last_blocks, avgpool, use_cls
        in_dim = (sum(in_channels[-n_last_blocks:]) if use_cls else 0) + (in_channels[-1] if avgpool else 0)
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Features, image_size: tuple[int, int]) -> torch.Tensor:
        """Returns logits ``(B, K)``."""
        parts = []
        if self.use_cls:
            if features.cls is None:
                raise ValueError("these features have no class tokens (ConvNeXt?): build LinearClassifier(use_cls=False)")
            parts += [c.float() for c in features.cls[-self.n_last_blocks:]]
        if self.avgpool:
            parts.append(features.maps[-1].float().mean(dim=(2, 3)))
        return self.linear(torch.cat(parts, dim=1))

    def loss(self, outputs: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        return {"loss_ce": F.cross_entropy(outputs, targets["label"])}

    def predict(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        return outputs


class LinearSegHead(nn.Module):
    """Meta's linear segmentation head: resize layers to the first one's grid, concatenate, dropout, BatchNorm, 1x1 conv.

    Under DDP, Lightning's ``sync_batchnorm=True`` (set in ``conf/trainer/ddp.yaml``) turns the BatchNorm into
    SyncBatchNorm.

    Args:
        in_channels: channels of the maps used (all of them are concatenated).
        dropout: ``Dropout2d`` rate before BatchNorm.
        loss, loss_weights, avg_non_ignore, loss_options: the per-pixel loss, see ``heads.seg_losses.SegLoss``
            (default: cross-entropy averaged over labelled pixels; Meta's recipe averages over all pixels).
        loss_points: 0 (default, every recipe's): the loss over every pixel at full resolution; N > 0: the
            cross-entropy estimated from N labelled pixels per image (``SegLoss(points=N)``, unbiased, faster).

    ``output_stride``: the logits' grid is the first map's (``strides[0]``); ``predict_native`` gives them there,
    and ``predict`` is their bilinear upsampling (``predict_upsamples_native``: a sliding window may upsample each
    window itself as it stitches, ``tasks.inference.WindowMean``).
    """

    predict_upsamples_native = True

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int, dropout: float = 0.1,
                 loss="ce", loss_weights=None, avg_non_ignore: bool = True, loss_options=None, loss_points: int = 0):
        super().__init__()
        self.criterion = SegLoss(loss, loss_weights, avg_non_ignore=avg_non_ignore, loss_options=loss_options,
                                 points=loss_points)
        channels = sum(in_channels)
        self.output_stride = int(strides[0])
        self.dropout = nn.Dropout2d(dropout)
        self.batchnorm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Features, image_size: tuple[int, int]) -> torch.Tensor:
        """Returns logits ``(B, K, h, w)`` on the first map's grid."""
        size = features.maps[0].shape[-2:]
        maps = [m.float() if m.shape[-2:] == size else F.interpolate(m.float(), size, mode="bilinear", align_corners=False)
                for m in features.maps]
        return self.conv(self.batchnorm(self.dropout(torch.cat(maps, dim=1))))

    def loss(self, outputs: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        """The configured losses (default cross-entropy) on logits upsampled to the mask size ``(B, H, W)``, 255 ignored."""
        return self.criterion(outputs, targets["mask"])

    def predict(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Class logits ``(B, K, H, W)`` at ``image_size``."""
        return F.interpolate(outputs, image_size, mode="bilinear", align_corners=False)

    def predict_native(self, outputs: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K, h, w)`` on their own grid (``output_stride`` pixels per cell), not upsampled."""
        return outputs
