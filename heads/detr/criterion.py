"""Set-prediction losses for DETR heads: sigmoid focal loss, L1 and GIoU, with aux / encoder / one-to-many terms.

Boxes are ``cxcywh``, normalised (``DETRHead``) or in pixels (``PlainDETRHead``). Every term is normalised by the
number of target boxes averaged over processes (``all_reduce``) and clamped to ``>= 1``, as in Deformable DETR.
A prediction set that carries ``pred_deltas`` and ``pred_boxes_old`` (Plain-DETR's re-parameterised boxes) gets
its L1 loss and L1 matching cost on deltas (``bbox2delta`` of the reference box to the target) instead of
coordinates; GIoU always compares the boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from ..ops import average_over_processes
from .box_reparam import box_deltas
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


def box_losses(pred_boxes: Tensor, boxes: list[Tensor], indices, num_boxes: Tensor, pred_deltas: Tensor | None = None,
               references: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """L1 and ``1 - GIoU`` of matched pairs, each summed and divided by ``num_boxes``.

    ``0 * pred_boxes.sum()`` is added so the box branch stays in the graph when no image has a box.

    Args:
        pred_boxes: ``(B, Q, 4)`` cxcywh; boxes: ``B`` tensors ``(N_i, 4)`` cxcywh; indices: matcher output.
        pred_deltas / references: ``(B, Q, 4)``: L1 between the predicted deltas and ``box_deltas(reference, target)``.
    """
    dev = pred_boxes.device

    def matched(x: Tensor) -> Tensor:
        return torch.cat([x[b, q.to(dev)] for b, (q, _) in enumerate(indices)])

    src = matched(pred_boxes)
    tgt = torch.cat([boxes[b][t.to(dev)] for b, (_, t) in enumerate(indices)]).to(src)
    zero = pred_boxes.sum() * 0.0
    if pred_deltas is not None:
        zero = zero + pred_deltas.sum() * 0.0
    if len(src) == 0:
        return zero, zero.clone()
    if pred_deltas is None:
        l1 = (src - tgt).abs().sum() / num_boxes
    else:
        l1 = (matched(pred_deltas) - box_deltas(matched(references), tgt)).abs().sum() / num_boxes
    giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
    return l1 + zero, (1 - giou).sum() / num_boxes + zero


class SetCriterion(nn.Module):
    """Hungarian-matched DETR loss.

    Args:
        matcher: assigns queries to targets.
        class_weight / bbox_weight / giou_weight: weights of the focal, L1 and GIoU terms.
        focal_alpha / focal_gamma: focal loss parameters.
        class_agnostic_proposals: the encoder proposals are matched and trained as one class (every target label 0,
            H-DETR / Plain-DETR); otherwise with the targets' labels.
        one_to_many_weight: factor on the one-to-many terms (``lambda_one2many``).
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_agnostic_proposals: bool = False,
        one_to_many_weight: float = 1.0,
    ):
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_focal": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.class_agnostic_proposals = class_agnostic_proposals
        self.one_to_many_weight = one_to_many_weight

    def single(self, outputs: dict, targets: list[dict], num_boxes: Tensor) -> dict[str, Tensor]:
        """Unweighted focal / L1 / GIoU terms of one prediction set: ``pred_logits (B, Q, K)``, ``pred_boxes (B, Q, 4)``
        and, for re-parameterised boxes, ``pred_deltas`` / ``pred_boxes_old`` ``(B, Q, 4)``."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        deltas, references = outputs.get("pred_deltas"), outputs.get("pred_boxes_old")
        reparam = {} if deltas is None else {"pred_deltas": deltas.detach(), "references": references.detach()}
        indices = self.matcher(logits.detach(), boxes.detach(), targets, **reparam)
        labels = [t["labels"] for t in targets]
        l_focal = focal_loss(logits, labels, indices, num_boxes, self.focal_alpha, self.focal_gamma)
        l_bbox, l_giou = box_losses(boxes, [t["boxes"] for t in targets], indices, num_boxes, deltas, references)
        return {"loss_focal": l_focal, "loss_bbox": l_bbox, "loss_giou": l_giou}

    @staticmethod
    def _sets(outputs: dict, suffix: str) -> list[dict]:
        main = {k.removesuffix(suffix): v for k, v in outputs.items()
                if k.startswith("pred_") and k.endswith(suffix) and (suffix or "one2many" not in k)}
        return [main, *outputs.get("aux_outputs" + suffix, [])]

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
        losses = self._sum([(s, targets) for s in self._sets(outputs, "")], num_boxes, "", 1.0)
        if "enc_outputs" in outputs:
            enc_targets = targets
            if self.class_agnostic_proposals:
                enc_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            enc = self._sum([(outputs["enc_outputs"], enc_targets)], num_boxes, "", 1.0)
            losses = {k: losses[k] + enc[k] for k in losses}
        if "pred_logits_one2many" in outputs and one_to_many_k > 0:
            rep = [
                {"labels": t["labels"].repeat(one_to_many_k), "boxes": t["boxes"].repeat(one_to_many_k, 1)}
                for t in targets
            ]
            num_rep = average_over_processes(n_local * one_to_many_k, device)
            sets = [(s, rep) for s in self._sets(outputs, "_one2many")]
            losses.update(self._sum(sets, num_rep, "_one2many", self.one_to_many_weight))
        return losses

    def _sum(self, sets: list[tuple[dict, list[dict]]], num_boxes: Tensor, suffix: str,
             factor: float) -> dict[str, Tensor]:
        total = {k: 0.0 for k in self.weights}
        for outputs, targets in sets:
            for k, v in self.single(outputs, targets, num_boxes).items():
                total[k] = total[k] + v
        return {k + suffix: factor * self.weights[k] * v for k, v in total.items()}
