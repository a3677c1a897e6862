"""Mask logits of one prediction layer, read only where the matcher and the loss need them.

Mask2Former's mask logits are ``masks[b, q] = sum_c embed[b, q, c] * features[b, c]`` (query mask embeddings
``(B, Q, C)`` times per-pixel embeddings ``(B, C, H, W)``). Training needs them only

- at ``P`` random points shared by all queries of an image (the matcher's costs), and
- in full for the few matched queries (uncertainty point sampling and the point losses, ``select_matched``).

Bilinear point reading is linear in the map, so the logits at a point are the embeddings times the features
read at that point: ``Q x C x P`` products per image instead of ``Q x C x H x W``, and no ``(B, Q, H, W)``
tensor (nor its gradient) per layer. ``FactoredMaskLogits`` reads logits this way; ``DenseMaskLogits`` reads
them from a given ``(B, Q, H, W)`` tensor (the reference algorithm, and what ``transformers`` tests feed in).
Both give the same numbers up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import ms_deform_attn_core


def point_sample(inputs: Tensor, coords: Tensor, **grid_sample_kwargs) -> Tensor:
    """Bilinearly read ``inputs`` ``(N, C, H, W)`` at ``coords`` ``(N, P, 2)`` in ``[0, 1]`` ``(x, y)`` -> ``(N, C, P)``."""
    grid_sample_kwargs.setdefault("align_corners", False)
    return F.grid_sample(inputs, 2.0 * coords[:, :, None, :] - 1.0, **grid_sample_kwargs).squeeze(3)


class DenseMaskLogits:
    """Reads mask logits from ``masks`` ``(B, Q, H, W)``."""

    def __init__(self, masks: Tensor):
        self.masks = masks
        self.device = masks.device

    def at_points(self, b: int, coords: Tensor) -> Tensor:
        """Float logits of every query of image ``b`` at ``coords`` ``(P, 2)`` in ``[0, 1]`` ``(x, y)``: ``(Q, P)``."""
        return point_sample(self.masks[b][None].float(), coords[None])[0]

    def select(self, queries: Sequence[Tensor]) -> Tensor:
        """Float logits of the queries ``queries[b]`` of each image ``b``, concatenated: ``(N, H, W)``."""
        batch = torch.cat([torch.full_like(q, b) for b, q in enumerate(queries)]).to(self.device)
        return self.masks[batch, torch.cat(list(queries)).to(self.device)].float()

    def zero(self) -> Tensor:
        """A zero that depends on every input (keeps their parameters in the graph when nothing is matched)."""
        return self.masks.sum() * 0.0


class FactoredMaskLogits:
    """Reads ``einsum("bqc,bchw->bqhw", embed, features)`` without forming it.

    Args:
        embed: ``(B, Q, C)`` query mask embeddings.
        features: ``(B, C, H, W)`` per-pixel embeddings.
        pixels: ``features`` as float rows ``(B, H * W, C)`` (detached), shared by the layers of one output;
            made from ``features`` when None.
    """

    def __init__(self, embed: Tensor, features: Tensor, pixels: Tensor | None = None):
        self.embed = embed
        self.features = features
        self.pixels = pixel_rows(features) if pixels is None else pixels
        self.device = features.device

    def at_points(self, b: int, coords: Tensor) -> Tensor:
        """Float logits of every query of image ``b`` at ``coords`` ``(P, 2)``: ``(Q, P)``, no gradient.

        The features are read at the points by ``ms_deform_attn_core`` (one level, one head, one point per
        query, weight 1: exactly bilinear reading with ``grid_sample``'s ``align_corners=False`` and zero
        padding), then multiplied by the embeddings.
        """
        h, w = self.features.shape[-2:]
        value = self.pixels[b][None, :, None, :]  # (1, H*W, 1, C)
        locations = coords[None, :, None, None, None, :].to(self.pixels.dtype)  # (1, P, 1, 1, 1, 2)
        ones = torch.ones(locations.shape[:-1], dtype=self.pixels.dtype, device=self.device)
        with torch.no_grad():
            read = ms_deform_attn_core(value, [(h, w)], locations, ones)[0]  # (P, C)
            return self.embed[b].detach().float() @ read.T

    def zero(self) -> Tensor:
        """A zero that depends on the embeddings and the features."""
        return (self.embed.sum() + self.features.sum()) * 0.0


def pixel_rows(features: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> detached float ``(B, H * W, C)``, the value table of ``FactoredMaskLogits.at_points``."""
    return features.detach().float().flatten(2).transpose(1, 2).contiguous()


def layer_mask_logits(layers: Sequence[dict]) -> list[DenseMaskLogits | FactoredMaskLogits]:
    """The mask logits of each prediction dict: factored when it has ``mask_embed`` and ``mask_features``
    (``MaskedTransformerDecoder``'s output), else dense from ``pred_masks``. Layers sharing one
    ``mask_features`` tensor share its pixel rows."""
    rows: dict[int, Tensor] = {}
    out = []
    for layer in layers:
        if "mask_embed" in layer:
            features = layer["mask_features"]
            if id(features) not in rows:
                rows[id(features)] = pixel_rows(features)
            out.append(FactoredMaskLogits(layer["mask_embed"], features, rows[id(features)]))
        else:
            out.append(DenseMaskLogits(layer["pred_masks"]))
    return out


def select_matched(masks: Sequence[DenseMaskLogits | FactoredMaskLogits], queries: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Float logits (with gradient) of the queries ``queries[l][b]`` of each image ``b`` in layer ``l``: per layer
    ``(N_l, H, W)``, image-major.

    Factored layers sharing their features are read together: per image, one product of the selected
    embeddings of all those layers with the image's features. The backward then forms the features' gradient
    once per image, with the matches of every layer (~100) as inner dimension, instead of once per layer with
    ~10 (a product that thin runs several times slower per multiply-add on CPU BLAS).
    """
    out: list[Tensor | None] = [None] * len(masks)
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(masks):
        if isinstance(m, FactoredMaskLogits):
            groups.setdefault(id(m.features), []).append(i)
        else:
            out[i] = m.select(queries[i])
    for ids in groups.values():
        features = masks[ids[0]].features
        h, w = features.shape[-2:]
        per_image = []
        for b, pixels in enumerate(features.flatten(2).unbind(0)):  # (C, H*W) each
            rows = [masks[i].embed[b, queries[i][b].to(features.device)] for i in ids]
            per_image.append((torch.cat(rows) @ pixels).split([len(r) for r in rows]))
        for k, i in enumerate(ids):
            out[i] = torch.cat([chunks[k] for chunks in per_image]).view(-1, h, w).float()
    return out
