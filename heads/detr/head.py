"""DETR-style detection head (Deformable-DETR / Plain-DETR line) for frozen backbone features.

Multi-scale input -> deformable encoder -> (two-stage) top-k encoder proposals as reference boxes ->
deformable decoder with iterative box refinement -> per-layer sigmoid class logits and cxcywh boxes.
Optional hybrid matching (Plain-DETR / H-DETR): extra one-to-many queries, training only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from ..ops.ms_deform_attn import as_size
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .transformer import (
    MLP,
    DeformableDecoder,
    DeformableEncoder,
    MultiScaleInput,
    inverse_sigmoid,
    level_geometry,
    sine_embed,
)


def _class_head(dim: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    lin = nn.Linear(dim, num_classes)
    nn.init.constant_(lin.bias, -math.log((1 - prior_prob) / prior_prob))
    return lin


def _box_head(dim: int) -> MLP:
    mlp = MLP(dim, dim, 4, 3)
    nn.init.zeros_(mlp.layers[-1].weight)
    nn.init.zeros_(mlp.layers[-1].bias)
    return mlp


class DETRHead(nn.Module):
    """Deformable-DETR head with two-stage query selection, box refinement and optional hybrid matching.

    Args:
        in_channels / strides: of the backbone maps (ViT: four stride-16 maps; ConvNeXt: strides 4/8/16/32).
        num_classes: ``K`` (sigmoid classes, no no-object column).
        hidden_dim: transformer width ``D``.
        num_queries: one-to-one queries ``Q``.
        enc_layers / dec_layers: transformer depth.
        num_heads / num_points: deformable attention heads and sampling points per level.
        num_levels: feature levels, at strides ``8 * 2**l`` (8/16/32/64 for 4 levels) unless ``level_strides`` is given.
        two_stage: encoder proposals (top-k by class score) give the initial reference boxes; content queries stay
            learned (mixed query selection). Otherwise learned reference boxes.
        box_refine: each decoder layer refines the previous layer's boxes (separate heads per layer).
        one_to_many_k: hybrid matching repeat factor (0 = off); ``num_queries_one2many`` extra queries, training only.
        class_weight / bbox_weight / giou_weight: loss and matching-cost weights.
        focal_alpha / focal_gamma: focal loss parameters.
        topk: detections kept per image by :meth:`predict`.
        ffn_dim: feed-forward width.
        level_strides: explicit level strides (overrides ``num_levels``).
        class_agnostic_proposals: encoder proposals ranked by class 0's score and trained as one class (H-DETR /
            Plain-DETR / Meta); off: ranked by the best class score and trained with the targets' labels.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 300,
        enc_layers: int = 6,
        dec_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        num_levels: int = 4,
        two_stage: bool = True,
        box_refine: bool = True,
        one_to_many_k: int = 0,
        num_queries_one2many: int = 0,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        topk: int = 100,
        ffn_dim: int = 1024,
        level_strides: Sequence[int] | None = None,
        class_agnostic_proposals: bool = False,
    ):
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"{len(in_channels)} in_channels but {len(strides)} strides")
        self.level_strides = list(level_strides) if level_strides else [8 * 2**i for i in range(num_levels)]
        L = len(self.level_strides)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.one_to_many_k = one_to_many_k
        self.num_queries_one2many = num_queries_one2many if one_to_many_k > 0 else 0
        self.two_stage = two_stage
        self.topk = topk
        self.hidden_dim = hidden_dim
        self.class_agnostic_proposals = class_agnostic_proposals

        self.input_proj = MultiScaleInput(in_channels, strides, hidden_dim, self.level_strides)
        self.level_embed = nn.Parameter(torch.randn(L, hidden_dim) * 0.02)
        self.encoder = DeformableEncoder(enc_layers, hidden_dim, num_heads, L, num_points, ffn_dim)
        if box_refine:
            class_embed = nn.ModuleList(_class_head(hidden_dim, num_classes) for _ in range(dec_layers))
            bbox_embed = nn.ModuleList(_box_head(hidden_dim) for _ in range(dec_layers))
        else:
            cls, box = _class_head(hidden_dim, num_classes), _box_head(hidden_dim)
            class_embed = nn.ModuleList([cls] * dec_layers)
            bbox_embed = nn.ModuleList([box] * dec_layers)
        self.decoder = DeformableDecoder(
            dec_layers, hidden_dim, num_heads, L, num_points, ffn_dim, class_embed, bbox_embed, box_refine
        )
        total_q = num_queries + self.num_queries_one2many
        self.tgt_embed = nn.Embedding(total_q, hidden_dim)
        if two_stage:
            self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
            self.enc_class = _class_head(hidden_dim, num_classes)
            self.enc_bbox = _box_head(hidden_dim)
        else:
            self.ref_embed = nn.Embedding(total_q, 4)
            nn.init.uniform_(self.ref_embed.weight[:, :2], -2.0, 2.0)
            nn.init.constant_(self.ref_embed.weight[:, 2:], -2.0)
        self.criterion = SetCriterion(
            HungarianMatcher(class_weight, bbox_weight, giou_weight, focal_alpha, focal_gamma),
            class_weight,
            bbox_weight,
            giou_weight,
            focal_alpha,
            focal_gamma,
            class_agnostic_proposals=class_agnostic_proposals,
        )

    # ------------------------------------------------------------------ forward
    def _queries(self) -> int:
        return self.num_queries + (self.num_queries_one2many if self.training else 0)

    def _attn_mask(self, device) -> Tensor | None:
        """``(Q_total, Q_total)`` bool mask keeping one-to-one and one-to-many queries apart (True = blocked)."""
        if not (self.training and self.num_queries_one2many):
            return None
        n1, total = self.num_queries, self._queries()
        group = torch.arange(total, device=device) >= n1
        return group[:, None] != group[None, :]

    def forward(self, features, image_size: tuple[int, int]) -> dict:
        """Detect.

        Args:
            features: :class:`backbones.features.Features` (``maps`` ``(B, C_i, h_i, w_i)``).
            image_size: ``(H, W)`` of the network input.

        Returns:
            dict with ``pred_logits (B, Q, K)``, ``pred_boxes (B, Q, 4)`` normalised cxcywh, ``aux_outputs`` (list of
            ``{pred_logits, pred_boxes}`` for the earlier decoder layers), ``enc_outputs`` (two-stage:
            ``pred_logits (B, S, K)``, ``pred_boxes (B, S, 4)`` for all ``S`` encoder tokens), ``image_size``, and in
            training with hybrid matching ``pred_logits_one2many``, ``pred_boxes_one2many``, ``aux_outputs_one2many``.
        """
        maps = [m.float() for m in features.maps]
        # deformable attention and box regression run in float32 (as Meta's Plain-DETR does), even under autocast
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            return self._forward(maps, image_size)

    def _forward(self, maps: list[Tensor], image_size: tuple[int, int]) -> dict:
        levels = self.input_proj(maps)
        shapes = [tuple(x.shape[-2:]) for x in levels]
        B, device = levels[0].shape[0], levels[0].device
        centres, ratios = level_geometry(shapes, self.level_strides, image_size, device)
        level_ids = torch.cat([torch.full((h * w,), i, device=device) for i, (h, w) in enumerate(shapes)])
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)  # (B, S, D)
        pos = (sine_embed(centres, self.hidden_dim // 2) + self.level_embed[level_ids])[None]
        memory = self.encoder(src, pos, centres, ratios, shapes)

        nq = self._queries()
        out: dict = {"image_size": tuple(image_size)}
        tgt = self.tgt_embed.weight[:nq][None].expand(B, -1, -1)
        if self.two_stage:
            if memory.shape[1] < nq:
                raise ValueError(
                    f"two-stage selection needs at least {nq} encoder tokens, got {memory.shape[1]}: "
                    "use fewer queries or larger images"
                )
            enc = self.enc_output(memory)
            proposals = torch.cat([centres, 0.05 * 2.0 ** level_ids[:, None].float().expand(-1, 2)], -1)
            enc_logits = self.enc_class(enc)
            enc_boxes = (self.enc_bbox(enc) + inverse_sigmoid(proposals)[None]).sigmoid()
            out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes}
            inside = ((centres > 0) & (centres < 1)).all(-1)
            score = enc_logits.detach()[..., 0] if self.class_agnostic_proposals else enc_logits.detach().max(-1).values
            score = score.masked_fill(~inside[None], float("-inf"))
            idx = score.topk(nq, dim=1).indices
            reference = torch.gather(enc_boxes.detach(), 1, idx[..., None].expand(-1, -1, 4))
        else:
            reference = self.ref_embed.weight[:nq].sigmoid()[None].expand(B, -1, -1)

        logits, boxes = self.decoder(tgt, reference, memory, ratios, shapes, self._attn_mask(device))
        n1 = self.num_queries
        out["pred_logits"], out["pred_boxes"] = logits[-1][:, :n1], boxes[-1][:, :n1]
        out["aux_outputs"] = [
            {"pred_logits": lg[:, :n1], "pred_boxes": bx[:, :n1]} for lg, bx in zip(logits[:-1], boxes[:-1])
        ]
        if nq > n1:
            out["pred_logits_one2many"], out["pred_boxes_one2many"] = logits[-1][:, n1:], boxes[-1][:, n1:]
            out["aux_outputs_one2many"] = [
                {"pred_logits": lg[:, n1:], "pred_boxes": bx[:, n1:]} for lg, bx in zip(logits[:-1], boxes[:-1])
            ]
        return out

    # ------------------------------------------------------------------ loss / predict
    def loss(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        """Weighted set losses.

        Args:
            outputs: from :meth:`forward`.
            targets: ``boxes``: ``B`` tensors ``(N_i, 4)`` xyxy in input pixels; ``labels``: ``B`` tensors ``(N_i,)``.

        Returns:
            ``loss_focal``, ``loss_bbox``, ``loss_giou`` summed over decoder layers and encoder proposals (and
            ``*_one2many`` with hybrid matching); total = sum of values.
        """
        H, W = outputs["image_size"]
        device = outputs["pred_boxes"].device
        scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=device)
        norm_targets = [
            {
                "labels": lab.to(device=device, dtype=torch.int64),
                "boxes": box_convert(box.to(device=device, dtype=torch.float32).reshape(-1, 4), "xyxy", "cxcywh")
                / scale,
            }
            for box, lab in zip(targets["boxes"], targets["labels"])
        ]
        return self.criterion(outputs, norm_targets, self.one_to_many_k)

    @torch.no_grad()
    def predict_batched(self, outputs: dict, image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`predict` as batch tensors ``boxes (B, k, 4)``, ``scores (B, k)``, ``labels (B, k)``.

        No Python loop over the batch and no Python value of a size, so it traces with a dynamic batch and
        image size (ONNX export).
        """
        H, W = as_size(image_size[0]), as_size(image_size[1])
        prob = outputs["pred_logits"].float().sigmoid()
        Q, K = prob.shape[1:]
        k = min(self.topk, Q * K)
        scores, idx = prob.flatten(1).topk(k, dim=1)
        query, labels = idx // K, idx % K
        boxes = torch.gather(outputs["pred_boxes"].float(), 1, query[..., None].expand(-1, -1, 4))
        scale = torch.stack([torch.scalar_tensor(v, dtype=torch.float32, device=prob.device) for v in (W, H, W, H)])
        return box_convert(boxes, "cxcywh", "xyxy") * scale, scores, labels

    @torch.no_grad()
    def predict(self, outputs: dict, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Top-k over all ``(query, class)`` sigmoid scores (Deformable-DETR post-processing).

        Returns:
            one dict per image: ``boxes (k, 4)`` xyxy in ``image_size`` pixels, ``scores (k,)``, ``labels (k,)``.
            The caller maps them to the original image: padding is bottom/right, so with the original ``(h0, w0)``
            resized to ``(h1, w1)`` before padding to ``image_size``, use ``boxes * [w0/w1, h0/h1, w0/w1, h0/h1]``
            (clip to the original size if wanted).
        """
        boxes, scores, labels = self.predict_batched(outputs, image_size)
        return [{"boxes": boxes[b], "scores": scores[b], "labels": labels[b]} for b in range(boxes.shape[0])]
