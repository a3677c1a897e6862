"""Meta's released DINOv3 COCO detector head (``dinov3_vit7b16_de``: ``{"model": state_dict}`` of a
``PlainDETRReParam`` without its backbone) as a :class:`~heads.detr.plain_detr.PlainDETRHead`.

Sizes are read from the tensors' shapes: width, heads (of the position-bias MLPs), encoder / decoder depth and FFN
widths, classes and the total number of queries. What the file does not record is taken from Meta's hub config
(``dinov3/hub/detectors.py``): 3 x 3 windows (``backbone.windows``), Meta's layers ``m * depth // 4 - 1``, the
query split (half one-to-one, half one-to-many: 1500 + 1500), 1500 detections kept per image, proposal levels at
strides 8/16/32/64 with 50-px anchors.
"""

from __future__ import annotations

import re

import torch

from tasks.meta_heads import MetaFormat, MetaHead
from tasks.predictor import ExportError

from .coco_categories import coco_id_names

META_WINDOWS = 3
META_TOPK = 1500
_RENAMES = [
    (r"^input_proj\.0\.", "input_proj."),
    (r"^transformer\.level_embed$", "level_embed"),
    (r"^transformer\.encoder\.", "encoder."),
    (r"^transformer\.decoder\.(layers|final_layer_norm)", r"decoder.\1"),
    (r"^transformer\.(enc_output_proj|enc_output|enc_output_norm)\.", r"proposals.\1."),
    (r"^transformer\.(pos_trans|pos_trans_norm)\.", r"\1."),
]


def matches(state: dict[str, torch.Tensor]) -> bool:
    return "query_embed.weight" in state and any(k.startswith("transformer.decoder.layers.") and ".cpb_mlp1." in k
                                                 for k in state)


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def convert(state: dict[str, torch.Tensor], spec, source: str) -> MetaHead:
    """Map Meta's keys to ours and read the head's sizes; ``spec`` is the backbone's ``BackboneSpec``."""
    if spec.kind != "vit":
        raise ExportError(f"{source}: Meta's detector reads ViT features, not {spec.kind} ({spec.arch})")
    out_indices = [m * spec.depth // 4 - 1 for m in range(1, 5)]
    ours = {}
    for key, value in state.items():
        if key.startswith(("backbone.", "transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
            continue  # backbone (loaded from backbone_weights) and the decoder's aliases of bbox_embed / class_embed
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        ours[new] = value.reshape(-1) if new == "level_embed" else value
    try:
        hidden = state["query_embed.weight"].shape[1]
        in_channels = state["input_proj.0.0.weight"].shape[1]  # 2 views (global, windows) x 4 layers x width
        layer0 = "transformer.decoder.layers.0."
        head = {
            "_target_": "heads.detr.PlainDETRHead",
            "hidden_dim": hidden,
            "num_heads": state[layer0 + "cross_attn.cpb_mlp1.2.weight"].shape[0],
            "enc_layers": _count(state, r"^transformer\.encoder\.layers\.(\d+)\."),
            "enc_ffn_dim": state["transformer.encoder.layers.0.linear1.weight"].shape[0],
            "dec_layers": _count(state, r"^transformer\.decoder\.layers\.(\d+)\."),
            "dec_ffn_dim": state[layer0 + "linear1.weight"].shape[0],
            "rpe_hidden_dim": state[layer0 + "cross_attn.cpb_mlp1.0.weight"].shape[0],
            "num_queries": state["query_embed.weight"].shape[0] // 2,
            "num_queries_one2many": state["query_embed.weight"].shape[0] - state["query_embed.weight"].shape[0] // 2,
            "topk": META_TOPK,
        }
        num_classes = state["class_embed.0.weight"].shape[0]
    except KeyError as err:
        raise ExportError(f"{source}: Meta detector file without {err.args[0]!r}") from err
    if in_channels % (2 * len(out_indices)):
        raise ExportError(f"{source}: input_proj reads {in_channels} channels, not 2 views x 4 layers of one width")
    return MetaHead(kind="detection", head=head, state=ours, out_indices=out_indices, num_classes=num_classes,
                    class_names=coco_id_names(num_classes), backbone_args={"windows": META_WINDOWS})


META_DETECTOR = MetaFormat("detector (Plain-DETR, dinov3_*_de)", matches, convert)
