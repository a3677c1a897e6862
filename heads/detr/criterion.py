"""Set-prediction losses for DETR heads: sigmoid focal loss, L1 and GIoU, with aux / encoder / one-to-many terms.

All boxes are normalised ``cxcywh``. Every term is normalised by the number of target boxes averaged over
processes (``all_reduce``) and clamped to ``>= 1``, as in Deformable DETR.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from ..ops import average_over_processes
from .matcher import HungarianMatcher


def focal_loss(logits: Tensor, labels: list[Tensor], indices, num_boxes: Tensor, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss over all ``(query, class)`` pairs, summed and divided by ``num_boxes``.

    Args:
        logits: ``(B, Q, K)``; labels: ``B`` tensors ``(N_i,)``; indices: matcher output.
    """
    target = torch.zeros_like(logits)
    for b, (q, t) in enumerate(indices):
        target[b, q.to(logits.device), labels[b][t]] = 1.0
    return sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes


def box_losses(pred_boxes: Tensor, boxes: list[Tensor], indices, num_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """L1 and ``1 - GIoU`` of matched pairs, each summed and divided by ``num_boxes``.

    ``0 * pred_boxes.sum()`` is added so the box branch stays in the graph when no image has a box.

    Args:
        pred_boxes: ``(B, Q, 4)`` cxcywh; boxes: ``B`` tensors ``(N_i, 4)`` cxcywh; indices: matcher output.
    """
    dev = pred_boxes.device
    src = torch.cat([pred_boxes[b, q.to(dev)] for b, (q, _) in enumerate(indices)])
    tgt = torch.cat([boxes[b][t.to(dev)] for b, (_, t) in enumerate(indices)]).to(src)
    zero = pred_boxes.sum() * 0.0
    if len(src) == 0:
        return zero, zero.clone()
    l1 = (src - tgt).abs().sum() / num_boxes
    giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
    return l1 + zero, (1 - giou).sum() / num_boxes + zero


class SetCriterion(nn.Module):
    """Hungarian-matched DETR loss.

    Args:
        matcher: assigns queries to targets.
        class_weight / bbox_weight / giou_weight: weights of the focal, L1 and GIoU terms.
        focal_alpha / focal_gamma: focal loss parameters.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_focal": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def single(self, logits: Tensor, boxes: Tensor, targets: list[dict], num_boxes: Tensor) -> dict[str, Tensor]:
        """Unweighted focal / L1 / GIoU terms of one set: logits ``(B, Q, K)``, boxes ``(B, Q, 4)``."""
        indices = self.matcher(logits.detach(), boxes.detach(), targets)
        labels = [t["labels"] for t in targets]
        l_focal = focal_loss(logits, labels, indices, num_boxes, self.focal_alpha, self.focal_gamma)
        l_bbox, l_giou = box_losses(boxes, [t["boxes"] for t in targets], indices, num_boxes)
        return {"loss_focal": l_focal, "loss_bbox": l_bbox, "loss_giou": l_giou}

    def _sets(self, outputs: dict, suffix: str) -> list[tuple[Tensor, Tensor]]:
        sets = [(outputs["pred_logits" + suffix], outputs["pred_boxes" + suffix])]
        sets += [(a["pred_logits"], a["pred_boxes"]) for a in outputs.get("aux_outputs" + suffix, [])]
        return sets

    def forward(self, outputs: dict, targets: list[dict], one_to_many_k: int = 0) -> dict[str, Tensor]:
        """Weighted losses summed over the final layer, the aux layers and the encoder proposals.

        Args:
            outputs: ``pred_logits (B, Q, K)``, ``pred_boxes (B, Q, 4)``, optional ``aux_outputs`` (list of dicts),
                ``enc_outputs`` (dict), and ``pred_logits_one2many`` / ``pred_boxes_one2many`` /
                ``aux_outputs_one2many`` for hybrid matching.
            targets: ``B`` dicts ``labels (N_i,)``, ``boxes (N_i, 4)`` normalised cxcywh.
            one_to_many_k: how many times targets are repeated for the one-to-many branch.

        Returns:
            ``loss_focal``, ``loss_bbox``, ``loss_giou`` (and ``*_one2many`` when present), already weighted.
        """
        device = outputs["pred_logits"].device
        n_local = sum(len(t["labels"]) for t in targets)
        num_boxes = average_over_processes(n_local, device)
        self.last_num_boxes = float(num_boxes)
        sets = self._sets(outputs, "")
        if "enc_outputs" in outputs:
            sets.append((outputs["enc_outputs"]["pred_logits"], outputs["enc_outputs"]["pred_boxes"]))
        losses = self._sum(sets, targets, num_boxes, "")
        if "pred_logits_one2many" in outputs and one_to_many_k > 0:
            rep = [
                {"labels": t["labels"].repeat(one_to_many_k), "boxes": t["boxes"].repeat(one_to_many_k, 1)}
                for t in targets
            ]
            num_rep = average_over_processes(n_local * one_to_many_k, device)
            losses.update(self._sum(self._sets(outputs, "_one2many"), rep, num_rep, "_one2many"))
        return losses

    def _sum(self, sets, targets, num_boxes, suffix: str) -> dict[str, Tensor]:
        total = {k: 0.0 for k in self.weights}
        for logits, boxes in sets:
            for k, v in self.single(logits, boxes, targets, num_boxes).items():
                total[k] = total[k] + v
        return {k + suffix: self.weights[k] * v for k, v in total.items()}
