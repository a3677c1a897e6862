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
from .mask_logits import layer_mask_logits, point_sample, select_matched
from .matcher import HungarianMatcher, sample_matched_targets


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


def draw_uniform_points(n: int, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                        device=None) -> tuple[Tensor, Tensor | None]:
    """The uniform draws of PointRend importance sampling for ``n`` masks, in the reference order:
    ``int(num_points * oversample_ratio)`` candidates ``(n, S, 2)`` and the fresh points ``(n, R, 2)`` that complete
    the ``int(importance_sample_ratio * num_points)`` chosen ones (None when ``R = 0``), in ``[0, 1]``."""
    candidates = torch.rand(n, int(num_points * oversample_ratio), 2, device=device)
    num_random = num_points - int(importance_sample_ratio * num_points)
    return candidates, (torch.rand(n, num_random, 2, device=device) if num_random > 0 else None)


def choose_uncertain_points(logits: Tensor, candidates: Tensor, fresh: Tensor | None, num_uncertain: int) -> Tensor:
    """PointRend importance sampling on ``(N, 1, h, w)`` mask logits -> ``(N, P, 2)`` coords in ``[0, 1]``.

    Uncertainty is ``-|logit|``; of the ``candidates`` ``(N, S, 2)`` the ``num_uncertain`` most uncertain are kept,
    then the ``fresh`` points ``(N, R, 2)`` are appended (``P = num_uncertain + R``).
    """
    uncertainty = -point_sample(logits, candidates).abs()[:, 0]  # (N, S)
    idx = uncertainty.topk(num_uncertain, dim=1, sorted=False)[1]  # the losses average over points: order is free
    coords = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))
    return coords if fresh is None else torch.cat([coords, fresh], 1)


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
        self, preds: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
        draws: tuple[Tensor, Tensor | None], num_masks: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and dice of the ``N`` matched pairs, each summed over pairs / ``num_masks``.

        ``preds``: ``(N, 1, h, w)`` logits of the matched queries (image-major, as ``indices``); ``draws``: their
        ``draw_uniform_points``."""
        with torch.no_grad():
            coords = choose_uncertain_points(preds, *draws, int(self.importance_sample_ratio * self.num_points))
            labels, weights = sample_matched_targets(targets, indices, coords)
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

    def layer_terms(self, outputs: dict, targets: list[dict], num_masks: Tensor | float | None = None) -> list[dict[str, Tensor]]:
        """Unweighted ``{"ce", "mask", "dice"}`` of every supervised layer: the final prediction first, then ``aux_outputs``.

        A layer's mask logits come from its ``mask_embed`` and ``mask_features`` when it has them (only where
        needed, see ``mask_logits``), else from its ``pred_masks`` ``(B, Q, h, w)``. The random draws come in
        the reference order (match layer 1, draw its loss points, match layer 2, ...); the matched queries' logits
        of all layers are then read at once (``select_matched``), and the losses computed layer by layer.
        """
        if num_masks is None:
            num_masks = average_over_processes(sum(len(t["labels"]) for t in targets), outputs["pred_logits"].device)
        layers = [outputs]
        if self.deep_supervision:
            layers += list(outputs.get("aux_outputs", []))
        masks = layer_mask_logits(layers)
        plans = []
        for layer, m in zip(layers, masks):
            indices = self.matcher(layer["pred_logits"], m, targets)
            n = sum(len(src) for src, _ in indices)
            draws = draw_uniform_points(n, self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                                        m.device) if n else None
            plans.append((indices, draws))
        matched = select_matched(masks, [[src for src, _ in indices] for indices, _ in plans])
        terms = []
        for layer, m, (indices, draws), preds in zip(layers, masks, plans, matched):
            if draws is None:
                loss_mask = loss_dice = m.zero()  # keeps every mask parameter in the graph (DDP)
            else:
                loss_mask, loss_dice = self.loss_masks(preds[:, None], targets, indices, draws, num_masks)
            terms.append({"ce": self.loss_labels(layer["pred_logits"], targets, indices), "mask": loss_mask,
                          "dice": loss_dice})
        return terms

    def forward(self, outputs: dict, targets: list[dict], num_masks: Tensor | float | None = None) -> dict[str, Tensor]:
        terms = self.layer_terms(outputs, targets, num_masks)
        return {f"loss_{k}": w * sum(t[k] for t in terms) for k, w in self.weights.items()}
