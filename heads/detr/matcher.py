"""Hungarian matching between DETR queries and ground-truth boxes (Deformable-DETR costs).

Boxes are ``cxcywh``, normalised to ``[0, 1]`` (``DETRHead``) or in pixels (``PlainDETRHead``); logits are
per-class sigmoid logits (no no-object column). With re-parameterised boxes (Plain-DETR) the L1 cost compares
each query's predicted deltas with the deltas that would move its reference box onto the target.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from .box_reparam import box_deltas


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal classification cost of Deformable DETR.

    ``cost[q, j] = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``
    with ``p = sigmoid(logits[q, labels[j]])``.

    Args:
        logits: ``(Q, K)`` class logits.
        labels: ``(N,)`` target classes.

    Returns:
        ``(Q, N)`` cost (lower is better).
    """
    prob = logits.sigmoid()[:, labels]
    pos = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
    neg = (1 - alpha) * prob**gamma * (-(1 - prob + 1e-8).log())
    return pos - neg


def l1_box_cost(pred_boxes: Tensor, tgt_boxes: Tensor) -> Tensor:
    """``(Q, N)`` L1 distance between ``(Q, 4)`` and ``(N, 4)`` cxcywh boxes."""
    return torch.cdist(pred_boxes, tgt_boxes, p=1)


def delta_l1_cost(pred_deltas: Tensor, references: Tensor, tgt_boxes: Tensor) -> Tensor:
    """``(Q, N)`` L1 distance between ``(Q, 4)`` predicted deltas and the deltas from each query's ``(Q, 4)``
    reference box to each of the ``(N, 4)`` targets (cxcywh pixels)."""
    return (pred_deltas[:, None].float() - box_deltas(references, tgt_boxes, all_pairs=True)).abs().sum(-1)


def giou_box_cost(pred_boxes: Tensor, tgt_boxes: Tensor) -> Tensor:
    """``(Q, N)`` negative generalized IoU between ``(Q, 4)`` and ``(N, 4)`` cxcywh boxes."""
    return -generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``w_class C_focal + w_bbox C_L1 + w_giou C_GIoU``.

    Args:
        cost_class / cost_bbox / cost_giou: weights of the three terms (2 / 5 / 2 as in Deformable DETR).
        focal_alpha / focal_gamma: parameters of the focal class cost.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor,
                    deltas: Tensor | None = None, references: Tensor | None = None) -> Tensor:
        """Weighted cost for one image.

        Args:
            logits: ``(Q, K)``; boxes: ``(Q, 4)`` cxcywh; tgt_labels: ``(N,)``; tgt_boxes: ``(N, 4)`` cxcywh.
            deltas / references: ``(Q, 4)`` each: re-parameterised boxes, L1 cost on deltas (:func:`delta_l1_cost`).

        Returns:
            ``(Q, N)`` total cost.
        """
        c_class = focal_class_cost(logits, tgt_labels, self.focal_alpha, self.focal_gamma)
        c_l1 = l1_box_cost(boxes, tgt_boxes) if deltas is None else delta_l1_cost(deltas, references, tgt_boxes)
        return self.cost_class * c_class + self.cost_bbox * c_l1 + self.cost_giou * giou_box_cost(boxes, tgt_boxes)

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict], pred_deltas: Tensor | None = None,
                references: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            pred_logits: ``(B, Q, K)``; pred_boxes: ``(B, Q, 4)`` cxcywh.
            targets: ``B`` dicts with ``labels (N_i,)`` and ``boxes (N_i, 4)`` cxcywh (in the unit of pred_boxes).
            pred_deltas / references: ``(B, Q, 4)``: re-parameterised boxes (L1 cost on deltas).

        Returns:
            ``B`` pairs ``(query_idx, target_idx)`` of int64 tensors of length ``min(Q, N_i)``.
        """
        out = []
        for b, tgt in enumerate(targets):
            n = len(tgt["labels"])
            if n == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            reparam = {} if pred_deltas is None else {"deltas": pred_deltas[b], "references": references[b]}
            cost = self.cost_matrix(pred_logits[b].float(), pred_boxes[b].float(), tgt["labels"], tgt["boxes"].float(),
                                    **reparam)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out
