"""Mask2Former set criterion: Hungarian matching, then class CE + point-sampled mask BCE + dice.

Per prediction layer (the final one and, with deep supervision, every auxiliary one):

- ``ce``: cross-entropy over ``K + 1`` classes for every query (unmatched -> no-object, class
  weight ``no_object_weight``), weighted mean as in ``F.cross_entropy(weight=...)``.
- ``mask`` / ``dice``: for each matched (query, target) pair, ``num_points`` points chosen by
  uncertainty (``oversample_ratio * num_points`` random candidates, the ``importance_sample_ratio``
  share with logits closest to 0 kept, the rest random), BCE averaged over points and dice over
  points, summed over pairs and divided by ``num_masks`` (averaged over processes, >= 1).

Ignored pixels (255): every sampled point carries a weight = the bilinearly sampled validity map,
so points in ignored regions weigh 0 in BCE (weighted mean) and dice (weighted sums). Weighting
rather than re-sampling keeps the point sampler identical to the reference one, so an image with
no ignored pixel gives exactly the reference loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import average_over_processes
from .mask_logits import DenseMaskLogits, FactoredMaskLogits, layer_mask_logits, point_sample
from .matcher import HungarianMatcher, sample_targets


def semantic_to_targets(mask: Tensor, num_classes: int, ignore_index: int = 255) -> list[dict]:
    """Semantic maps ``(B, H, W)`` -> one dict per image: ``labels (N,)`` (sorted classes present),
    ``masks (N, H, W)`` float binary, ``valid`` ``(H, W)`` float (1 = labelled) or None when nothing is ignored."""
    targets = []
    for m in mask:
        ignored = m == ignore_index
        classes = torch.unique(m[~ignored])
        if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}, got {classes.tolist()}")
        targets.append(
            {
                "labels": classes.long(),
                "masks": (m[None] == classes[:, None, None]).float(),
                "valid": (~ignored).float() if bool(ignored.any()) else None,
            }
        )
    return targets


def sample_uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float) -> Tensor:
    """PointRend importance sampling on ``(N, 1, h, w)`` mask logits -> ``(N, num_points, 2)`` coords in ``[0, 1]``.

    Uncertainty is ``-|logit|``; of ``int(num_points * oversample_ratio)`` uniform candidates the
    ``int(importance_sample_ratio * num_points)`` most uncertain are kept, the rest are fresh uniform points.
    """
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits, coords).abs()[:, 0]  # (N, num_sampled)
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1, sorted=False)[1]  # the losses average over points: order is free
    coords = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=logits.device)], 1)
    return coords


class Mask2FormerCriterion(nn.Module):
    """Loss of a Mask2Former output dict against per-image targets (see ``semantic_to_targets``).

    ``forward(outputs, targets, num_masks=None)`` -> ``{"loss_ce", "loss_mask", "loss_dice"}``, each
    already multiplied by its weight and summed over layers. ``layer_terms`` gives the unweighted
    per-layer values (final layer first, then ``aux_outputs`` in order).
    """

    def __init__(
        self,
        num_classes: int,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.weights = {"ce": class_weight, "mask": mask_weight, "dice": dice_weight}
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, pred_logits: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Weighted CE over ``(B, Q, K+1)`` logits; unmatched queries target the no-object class ``K``."""
        b, q, _ = pred_logits.shape
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.int64, device=pred_logits.device)
        for i, (src, tgt) in enumerate(indices):
            labels = targets[i]["labels"]
            target_classes[i, src.to(pred_logits.device)] = labels[tgt.to(labels.device)].to(pred_logits.device)
        return F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, weight=self.empty_weight.float())

    def loss_masks(
        self, pred_masks: DenseMaskLogits | FactoredMaskLogits, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
        num_masks: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and dice of the matched pairs, each summed over pairs / ``num_masks``."""
        if sum(len(src) for src, _ in indices) == 0:
            zero = pred_masks.zero()  # keeps every mask parameter in the graph (DDP)
            return zero, zero
        preds = pred_masks.select([src for src, _ in indices])[:, None]  # (N, 1, h, w)
        masks = torch.cat([t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)])  # (N, H, W)
        valid = None
        if any(t.get("valid") is not None for t in targets):
            valid = torch.cat(
                [
                    (t["valid"] if t.get("valid") is not None else torch.ones_like(t["masks"][0]))[None].expand(len(tgt), -1, -1)
                    for t, (_, tgt) in zip(targets, indices)
                ]
            )
        with torch.no_grad():
            coords = sample_uncertain_points(preds, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
            labels, weights = sample_targets(masks, valid, coords)
        logits = point_sample(preds, coords).squeeze(1)  # (N, P)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        probs = logits.sigmoid()
        if weights is None:
            loss_mask = bce.mean(1)
            numerator = 2 * (probs * labels).sum(-1)
            denominator = probs.sum(-1) + labels.sum(-1)
        else:
            loss_mask = (bce * weights).sum(1) / weights.sum(1).clamp(min=1e-6)
            numerator = 2 * (probs * labels * weights).sum(-1)
            denominator = (probs * weights).sum(-1) + (labels * weights).sum(-1)
        loss_dice = 1 - (numerator + 1) / (denominator + 1)
        return loss_mask.sum() / num_masks, loss_dice.sum() / num_masks

    def layer_losses(self, pred_logits: Tensor, pred_masks: DenseMaskLogits | FactoredMaskLogits, targets: list[dict],
                     num_masks: Tensor) -> dict[str, Tensor]:
        """Match one prediction layer and return its unweighted ``{"ce", "mask", "dice"}``."""
        indices = self.matcher(pred_logits, pred_masks, targets)
        loss_mask, loss_dice = self.loss_masks(pred_masks, targets, indices, num_masks)
        return {"ce": self.loss_labels(pred_logits, targets, indices), "mask": loss_mask, "dice": loss_dice}

    def layer_terms(self, outputs: dict, targets: list[dict], num_masks: Tensor | float | None = None) -> list[dict[str, Tensor]]:
        """Unweighted terms of every supervised layer: the final prediction first, then ``aux_outputs``.

        A layer's mask logits come from its ``mask_embed`` and ``mask_features`` when it has them (only where
        needed, see ``mask_logits``), else from its ``pred_masks`` ``(B, Q, h, w)``."""
        if num_masks is None:
            num_masks = average_over_processes(sum(len(t["labels"]) for t in targets), outputs["pred_logits"].device)
        layers = [outputs]
        if self.deep_supervision:
            layers += list(outputs.get("aux_outputs", []))
        masks = layer_mask_logits(layers)
        return [self.layer_losses(o["pred_logits"], m, targets, num_masks) for o, m in zip(layers, masks)]

    def forward(self, outputs: dict, targets: list[dict], num_masks: Tensor | float | None = None) -> dict[str, Tensor]:
        terms = self.layer_terms(outputs, targets, num_masks)
        return {f"loss_{k}": w * sum(t[k] for t in terms) for k, w in self.weights.items()}
