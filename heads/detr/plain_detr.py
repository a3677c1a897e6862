"""Plain-DETR head, as Meta's DINOv3 COCO detector (``dinov3_vit7b16_de``) builds it.

All backbone maps (ViT: every requested layer, of the windowed and the global view, see ``backbone.windows``) are
concatenated and projected to ``hidden_dim`` (1x1 conv + GroupNorm); a global transformer encoder runs over the
single stride-16 map; the encoder output is resampled to proposal levels (strides 8/16/32/64) whose cells are
anchors in absolute pixels (side ``50 * 2**l``); the top-scoring proposals (class-agnostic: class column 0) give the
reference boxes of the queries (position from the box, content learned: mixed query selection); a pre-norm global
decoder with box-relative position bias refines them layer by layer (re-parameterised deltas, look-forward-twice).
Training adds one-to-many queries (hybrid matching); they never attend to the one-to-one queries.

A batch of differently sized images padded bottom/right to one size comes with a pixel padding mask
(``Features.padding_mask``), used as Meta's detector uses its ``NestedTensor`` mask: resampled (nearest) to the
feature map and every proposal level, the sine position encoding normalised by each image's valid extent, padded
tokens masked out of the encoder's attention, padded proposals invalid and each image's proposals / boxes clipped
to its own valid extent, padded cells biased by ``-100`` in the decoder's cross-attention. The backbone sees the
padding, as Meta's does. No mask (or one without a padded feature cell) runs the unmasked computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from ..ops.ms_deform_attn import as_size
from .box_reparam import apply_deltas, size_tensor
from .criterion import SetCriterion
from .global_encoder import GlobalEncoder
from .matcher import HungarianMatcher
from .padding_mask import resize_mask
from .position_encoding import box_position, masked_sine_position_map, sine_position_map
from .proposals import ProposalLevels
from .rpe_decoder import RPEDecoder
from .transformer import MLP


class PlainDETRHead(nn.Module):
    """Plain-DETR with a global encoder, box-RPE decoder, re-parameterised boxes and hybrid matching.

    Args:
        in_channels / strides: of the backbone maps; all maps must share one stride (the proposal input stride).
        num_classes: ``K`` sigmoid classes (Meta's COCO head: 91, indexed by COCO category id).
        hidden_dim / num_heads: transformer width and heads (Meta: 768 / 8).
        enc_layers / enc_ffn_dim: global encoder depth and FFN width (Meta: 6 / 2048).
        dec_layers / dec_ffn_dim: decoder depth and FFN width (Meta: 6 / 2048).
        rpe_hidden_dim: hidden width of the box-RPE MLPs (Meta: 512).
        num_queries: one-to-one queries ``Q`` (Meta: 1500); num_queries_one2many: extra training queries (Meta: 1500).
        one_to_many_k: repeats of the targets for the one-to-many queries (Meta: 6; 0 = hybrid matching off).
        one_to_many_weight: factor on the one-to-many losses (``lambda_one2many``, 1.0).
        proposal_strides: proposal level strides, relative to the input stride (Meta: 0.5 / 1 / 2 / 4).
        proposal_min_size: anchor side at the finest proposal level, pixels (Meta: 50).
        look_forward_twice: gradients of layer ``l``'s boxes reach layer ``l - 1``'s box head.
        dropout: in the decoder (Meta: 0.0); enc_dropout: in the encoder (0.1, the default Meta leaves in place).
        class_weight / bbox_weight / giou_weight: loss weights and matching-cost weights (Plain-DETR's reparam
            recipe: 2 / 1 / 2; the L1 terms compare deltas).
        focal_alpha / focal_gamma: focal loss.
        topk: detections kept per image by :meth:`predict` (Meta: 1500).
    """

    pixel_boxes = True  # pred_boxes are input pixels (DETRHead's: normalised); ONNX export normalises them

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        hidden_dim: int = 768,
        num_heads: int = 8,
        enc_layers: int = 6,
        enc_ffn_dim: int = 2048,
        dec_layers: int = 6,
        dec_ffn_dim: int = 2048,
        rpe_hidden_dim: int = 512,
        num_queries: int = 1500,
        num_queries_one2many: int = 1500,
        one_to_many_k: int = 6,
        one_to_many_weight: float = 1.0,
        proposal_strides: Sequence[float] = (0.5, 1, 2, 4),
        proposal_min_size: float = 50.0,
        look_forward_twice: bool = True,
        dropout: float = 0.0,
        enc_dropout: float = 0.1,
        class_weight: float = 2.0,
        bbox_weight: float = 1.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        topk: int = 1500,
    ):
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"{len(in_channels)} in_channels but {len(strides)} strides")
        if len(set(strides)) != 1:
            raise ValueError(f"PlainDETRHead reads maps of one stride (a ViT's), got strides {list(strides)}")
        if hidden_dim % 32:
            raise ValueError(f"hidden_dim {hidden_dim} must be a multiple of 32 (GroupNorm with 32 groups)")
        self.stride = int(strides[0])
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.one_to_many_k = one_to_many_k
        self.num_queries_one2many = num_queries_one2many if one_to_many_k > 0 else 0
        self.topk = topk

        self.input_proj = nn.Sequential(nn.Conv2d(sum(in_channels), hidden_dim, 1), nn.GroupNorm(32, hidden_dim))
        self.level_embed = nn.Parameter(torch.zeros(hidden_dim))
        self.encoder = GlobalEncoder(enc_layers, hidden_dim, num_heads, enc_ffn_dim, enc_dropout)
        level_strides = [int(round(f * self.stride)) for f in proposal_strides]
        self.proposals = ProposalLevels(hidden_dim, self.stride, level_strides, proposal_min_size)
        self.pos_trans = nn.Linear(2 * hidden_dim, 2 * hidden_dim)
        self.pos_trans_norm = nn.LayerNorm(2 * hidden_dim)
        self.query_embed = nn.Embedding(num_queries + num_queries_one2many, hidden_dim)
        self.decoder = RPEDecoder(dec_layers, hidden_dim, num_heads, dec_ffn_dim, rpe_hidden_dim, self.stride,
                                  dropout, look_forward_twice)
        # one class / box head per decoder layer, and a last one for the encoder proposals
        self.class_embed = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(dec_layers + 1))
        self.bbox_embed = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(dec_layers + 1))
        self._init_weights()
        self.criterion = SetCriterion(
            HungarianMatcher(class_weight, bbox_weight, giou_weight, focal_alpha, focal_gamma),
            class_weight, bbox_weight, giou_weight, focal_alpha, focal_gamma,
            class_agnostic_proposals=True, one_to_many_weight=one_to_many_weight,
        )

    def _init_weights(self) -> None:
        """Meta's / Plain-DETR's initialisation: Xavier for the transformer, truncated normal (0.02) in the decoder,
        class bias at prior 0.01, zero last box layer."""
        for module in (self.encoder, self.proposals, self.pos_trans):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        nn.init.normal_(self.level_embed)
        for m in self.decoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.input_proj[0].weight)
        nn.init.zeros_(self.input_proj[0].bias)
        bias = -math.log((1 - 0.01) / 0.01)
        for cls, box in zip(self.class_embed, self.bbox_embed):
            nn.init.constant_(cls.bias, bias)
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)

    # ------------------------------------------------------------------ forward
    def _queries(self) -> int:
        return self.num_queries + (self.num_queries_one2many if self.training else 0)

    def _attn_mask(self, device) -> Tensor | None:
        """``(Q_total, Q_total)`` bool mask keeping one-to-one and one-to-many queries apart (True = blocked)."""
        if not (self.training and self.num_queries_one2many):
            return None
        group = torch.arange(self._queries(), device=device) >= self.num_queries
        return group[:, None] != group[None, :]

    @staticmethod
    def _feature_mask(pixel_mask: Tensor | None, shape: tuple[int, int, int]) -> Tensor | None:
        """The ``(B, h, w)`` padding mask of the feature map (nearest), or ``None`` when no cell is padding."""
        if pixel_mask is None:
            return None
        if pixel_mask.dim() != 3 or pixel_mask.shape[0] != shape[0]:
            raise ValueError(f"padding_mask must be (B, H, W) bool with B = {shape[0]}, got {tuple(pixel_mask.shape)}")
        mask = resize_mask(pixel_mask.to(torch.bool), shape[1:])
        return mask if bool(mask.any()) else None

    def forward(self, features, image_size: tuple[int, int]) -> dict:
        """Detect.

        Args:
            features: :class:`backbones.features.Features` (all ``maps`` ``(B, C_i, h, w)`` at one stride; its
                ``padding_mask (B, H, W)``, when set, marks the padding of a batch of differently sized images).
            image_size: ``(H, W)`` of the network input (``h * stride``, ``w * stride``).

        Returns:
            ``pred_logits (B, Q, K)``; ``pred_boxes (B, Q, 4)`` cxcywh input pixels; ``pred_boxes_old`` (the reference
            boxes) and ``pred_deltas`` ``(B, Q, 4)``; ``aux_outputs`` (the same for the earlier decoder layers);
            ``enc_outputs`` (all proposals: ``pred_logits (B, S, K)``, ``pred_boxes``, ``pred_boxes_old`` (anchors),
            ``pred_deltas``); ``image_size``; in training with hybrid matching ``*_one2many`` and
            ``aux_outputs_one2many``.
        """
        maps = [m.float() for m in features.maps]
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            return self._forward(maps, image_size, getattr(features, "padding_mask", None))

    def _forward(self, maps: list[Tensor], image_size: tuple[int, int], pixel_mask: Tensor | None) -> dict:
        src = self.input_proj(torch.cat(maps, 1))
        B, D, h, w = src.shape
        need = max(self.proposals.strides) // self.stride
        if min(h, w) < need:
            raise ValueError(f"input {tuple(image_size)} gives a {h}x{w} map: proposals at stride "
                             f"{max(self.proposals.strides)} need at least {need}x{need} cells (larger images)")
        mask = self._feature_mask(pixel_mask, (B, h, w))
        src = src.flatten(2).transpose(1, 2)  # (B, h*w, D)
        if mask is None:
            pos = (sine_position_map(h, w, D, src.device) + self.level_embed)[None]
        else:
            pos = masked_sine_position_map(mask, D) + self.level_embed
        flat_mask = None if mask is None else mask.flatten(1)
        memory = self.encoder(src, pos, flat_mask)

        feats, anchors, size = self.proposals(memory, (h, w), mask)
        head = len(self.class_embed) - 1
        enc_logits = self.class_embed[head](feats)
        enc_deltas = self.bbox_embed[head](feats)
        enc_boxes = box_convert(apply_deltas(anchors, enc_deltas, size), "xyxy", "cxcywh")
        nq = self._queries()
        if enc_logits.shape[1] < nq:
            raise ValueError(f"query selection needs at least {nq} proposals, got {enc_logits.shape[1]}: "
                             "use fewer queries or larger images")
        idx = enc_logits[..., 0].topk(nq, dim=1).indices
        reference = torch.gather(enc_boxes, 1, idx[..., None].expand(-1, -1, 4)).detach()
        query_pos = self.pos_trans_norm(self.pos_trans(box_position(reference, 2 * D)))[..., :D]
        tgt = self.query_embed.weight[:nq][None].expand(B, -1, -1)
        hidden, boxes, refs, deltas = self.decoder(tgt, query_pos, reference, memory, pos.expand(B, -1, -1), (h, w),
                                                   size, self.bbox_embed, self._attn_mask(src.device), flat_mask)

        out: dict = {"image_size": tuple(image_size)}
        layers = [
            {"pred_logits": cls(x), "pred_boxes": b, "pred_boxes_old": r, "pred_deltas": d}
            for cls, x, b, r, d in zip(self.class_embed, hidden, boxes, refs, deltas)
        ]
        n1 = self.num_queries
        one2one = [{k: v[:, :n1] for k, v in layer.items()} for layer in layers]
        out.update(one2one[-1])
        out["aux_outputs"] = one2one[:-1]
        if nq > n1:
            one2many = [{k: v[:, n1:] for k, v in layer.items()} for layer in layers]
            out.update({k + "_one2many": v for k, v in one2many[-1].items()})
            out["aux_outputs_one2many"] = one2many[:-1]
        out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes, "pred_boxes_old": anchors,
                              "pred_deltas": enc_deltas}
        return out

    # ------------------------------------------------------------------ loss / predict
    def loss(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        """Weighted set losses (Plain-DETR / H-DETR).

        Args:
            outputs: from :meth:`forward`.
            targets: ``boxes``: ``B`` tensors ``(N_i, 4)`` xyxy input pixels; ``labels``: ``B`` tensors ``(N_i,)``.

        Returns:
            ``loss_focal``, ``loss_bbox`` (L1 of deltas), ``loss_giou`` summed over decoder layers and the
            class-agnostic encoder proposals, and ``*_one2many`` with hybrid matching; total = sum of values.
        """
        device = outputs["pred_boxes"].device
        pixel_targets = [
            {"labels": lab.to(device=device, dtype=torch.int64),
             "boxes": box_convert(box.to(device=device, dtype=torch.float32).reshape(-1, 4), "xyxy", "cxcywh")}
            for box, lab in zip(targets["boxes"], targets["labels"])
        ]
        return self.criterion(outputs, pixel_targets, self.one_to_many_k)

    @torch.no_grad()
    def predict_batched(self, outputs: dict, image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`predict` as batch tensors ``boxes (B, k, 4)``, ``scores (B, k)``, ``labels (B, k)`` (traceable)."""
        H, W = as_size(image_size[0]), as_size(image_size[1])
        prob = outputs["pred_logits"].float().sigmoid()
        Q, K = prob.shape[1:]
        k = min(self.topk, Q * K)
        scores, idx = prob.flatten(1).topk(k, dim=1)
        query, labels = idx // K, idx % K
        boxes = box_convert(torch.gather(outputs["pred_boxes"].float(), 1, query[..., None].expand(-1, -1, 4)),
                            "cxcywh", "xyxy")
        return torch.minimum(boxes.clamp(min=0), size_tensor((W, H, W, H), boxes)), scores, labels

    @torch.no_grad()
    def predict(self, outputs: dict, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Top-k over all ``(query, class)`` sigmoid scores, boxes clipped to the input (Meta's post-processing).

        Returns:
            one dict per image: ``boxes (k, 4)`` xyxy in ``image_size`` pixels, ``scores (k,)``, ``labels (k,)``.
        """
        boxes, scores, labels = self.predict_batched(outputs, image_size)
        return [{"boxes": boxes[b], "scores": scores[b], "labels": labels[b]} for b in range(boxes.shape[0])]
