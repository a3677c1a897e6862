"""Hungarian matching of mask queries to target masks (Mask2Former).

The cost of pairing query ``q`` with target ``t`` is
``cost_class * (-p_q[class_t]) + cost_mask * BCE(q, t) + cost_dice * Dice(q, t)``, where the mask
terms are averaged over ``num_points`` points drawn uniformly in the image (the same points for every
query and target of the image). Pixels marked invalid (``valid == 0``, i.e. label 255) are left out
of the point averages: each point carries the bilinearly sampled validity as a weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .mask_logits import DenseMaskLogits, FactoredMaskLogits, point_sample


def sample_targets(masks: Tensor, valid: Tensor | None, coords: Tensor) -> tuple[Tensor, Tensor | None]:
    """Targets and point weights at ``coords``.

    Args:
        masks: ``(N, H, W)`` binary target masks.
        valid: ``(N, H, W)`` (or broadcastable ``(1, H, W)``) 1 where the label is known, or None.
        coords: ``(N, P, 2)`` (or ``(1, P, 2)`` shared).

    Returns:
        ``labels (N, P)`` in ``[0, 1]`` and ``weights (N, P)`` or None. Ignored pixels have weight 0; a
        point between a labelled and an ignored pixel gets a fractional weight and its label is
        renormalised over the labelled neighbours only (``label / weight``). The image border
        counts as valid (``padding_mode="border"``), so with no ignored pixel every weight is 1.
    """
    def sample(maps: Tensor, **kwargs) -> Tensor:  # (n, H, W) -> (n, P)
        if coords.shape[0] == 1:  # shared points: the maps are channels of one image (one grid for all)
            return point_sample(maps[None].float(), coords, **kwargs)[0]
        return point_sample(maps[:, None].float(), coords.expand(maps.shape[0], -1, -1), **kwargs).squeeze(1)

    labels = sample(masks)
    if valid is None:
        return labels, None
    weights = sample(valid, padding_mode="border").expand_as(labels)
    return labelled_share(labels, weights), weights


def labelled_share(labels: Tensor, weights: Tensor) -> Tensor:
    """Sampled labels renormalised over the labelled neighbours: ``label / weight`` (0 where the weight is 0)."""
    return torch.where(weights > 0, labels / weights.clamp(min=1e-6), torch.zeros_like(labels)).clamp(0.0, 1.0)


def sample_matched_targets(targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                           coords: Tensor) -> tuple[Tensor, Tensor | None]:
    """``sample_targets`` for matched pairs, each read at its own points.

    Args:
        targets: per image ``masks (N_i, H, W)`` and ``valid`` ``(H, W)`` or None.
        indices: per image ``(query_idx, target_idx)`` of the matched pairs.
        coords: ``(N, P, 2)`` points of the ``N`` pairs, image-major as ``indices``.

    Returns:
        ``labels (N, P)`` and ``weights (N, P)`` (None when no image has ignored pixels). Every target of an
        image is matched once when there are at least as many queries as targets: the pairs' points are then
        put in target order and the image's masks read in place, with no ``(N, H, W)`` copy of them.
    """
    labels, weights, start = [], [], 0
    for t, (_, tgt) in zip(targets, indices):
        if len(tgt) == 0:
            continue
        masks, tgt = t["masks"], tgt.to(t["masks"].device)
        points = coords[start : start + len(tgt)]  # (n, P, 2)
        start += len(tgt)
        if len(tgt) == len(masks):
            order = torch.empty_like(tgt)
            order[tgt] = torch.arange(len(tgt), device=tgt.device)  # the pair matched to each target
            labels.append(point_sample(masks[:, None].float(), points[order])[:, 0][tgt])
        else:
            labels.append(point_sample(masks[tgt][:, None].float(), points)[:, 0])
        valid = t.get("valid")
        weights.append(None if valid is None else point_sample(
            valid[None, None].float(), points.reshape(1, -1, 2), padding_mode="border").view_as(labels[-1]))
    if all(w is None for w in weights):
        return torch.cat(labels), None
    weights = torch.cat([torch.ones_like(lab) if w is None else w for lab, w in zip(labels, weights)])
    return labelled_share(torch.cat(labels), weights), weights


def pairwise_sigmoid_ce(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean-over-points BCE of every (query, target) pair: ``(Q, P)``, ``(N, P)``, weights ``(P,)`` -> ``(Q, N)``.

    ``BCE(x, t) = t softplus(-x) + (1 - t) softplus(x) = softplus(x) - t x``, so one softplus and one product
    with the labels give every pair.
    """
    w = (torch.full_like(logits[0], 1.0 / logits.shape[1]) if weights is None
         else weights / weights.sum().clamp(min=1e-6))
    return (F.softplus(logits) @ w)[:, None] - (logits * w) @ labels.T


def pairwise_dice(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` for every pair: ``(Q, P)``, ``(N, P)`` -> ``(Q, N)``."""
    probs = logits.sigmoid()
    if weights is not None:
        probs = probs * weights
        t_sum = (labels * weights).sum(-1)
    else:
        t_sum = labels.sum(-1)
    numerator = 2 * probs @ labels.T
    denominator = probs.sum(-1)[:, None] + t_sum[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one matching of ``Q`` queries to the ``N_i`` targets of each image.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three costs.
        num_points: uniformly sampled points per image for the mask costs.

    ``forward(pred_logits (B, Q, K+1), pred_masks, targets)``: ``pred_masks`` the mask logits ``(B, Q, h, w)`` or a
    ``DenseMaskLogits`` / ``FactoredMaskLogits`` reader of them; ``targets`` a list
    of dicts with ``labels (N_i,)``, ``masks (N_i, H, W)`` and ``valid`` ``(H, W)`` or None; returns a
    list of ``(query_idx, target_idx)`` LongTensor pairs of length ``min(Q, N_i)``, ``query_idx`` sorted.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all costs are 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_masks: Tensor | DenseMaskLogits | FactoredMaskLogits,
                targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        masks = DenseMaskLogits(pred_masks) if isinstance(pred_masks, Tensor) else pred_masks
        indices = []
        for b, tgt in enumerate(targets):
            labels = tgt["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            probs = pred_logits[b].float().softmax(-1)
            cost_class = -probs[:, labels]  # (Q, N)
            coords = torch.rand(1, self.num_points, 2, device=masks.device)
            valid = tgt.get("valid")
            # the same points for every query and target: sample them as channels of one image
            t_points, w_points = sample_targets(tgt["masks"], None if valid is None else valid[None], coords)
            if w_points is not None:
                w_points = w_points[0]  # the same weights for every target of the image: (P,)
            p_points = masks.at_points(b, coords[0])  # (Q, P)
            cost_mask = pairwise_sigmoid_ce(p_points, t_points, w_points)
            cost_dice = pairwise_dice(p_points, t_points, w_points)
            cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            big = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
