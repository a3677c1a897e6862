"""Meta's released DINOv3 segmentor (``dinov3_vit7b16_ms``) -> our ``Mask2FormerHead`` with the ViT-Adapter neck.

Meta's file (``dinov3_vit7b16_ade20k_m2f_head-*.pth``) is the state dict of its ``FeatureDecoder`` without the
backbone: ``segmentation_model.0.*`` the ``DINOv3_Adapter`` (``level_embed``, ``spm``, ``interactions``, ``up``,
``norm1..4``) and ``segmentation_model.1.*`` the ``Mask2FormerHead`` (``pixel_decoder``, ``predictor``). Its
hub loader builds the adapter with Meta's defaults and the head with hidden 2048, 16 heads, FFN 4096, 100 queries,
6 encoder / 9 decoder layers. Here every size is read from the shapes (hidden width, FFN width, queries,
classes, layer counts, adapter stem width, value / FFN ratios, extra extractors, sampling points); only the head
counts are Meta's constant 16 (no shape holds them). The head is built with ``neck="adapter"`` and
``pixel_decoder_layout="meta"``; numerics equal Meta's modules on the same weights (``tests/test_m2f_meta.py``).
"""

from __future__ import annotations

import re

import torch

from dense_data.ade20k import CLASS_NAMES as ADE20K_CLASS_NAMES
from tasks.meta_heads import MetaFormat, MetaHead
from tasks.predictor import ExportError

ADAPTER, HEAD = "segmentation_model.0.", "segmentation_model.1."
META_NUM_HEADS = 16  # Meta's adapter, pixel decoder and transformer decoder all use 16 heads
META_EVAL = {"preset": "meta_m2f"}  # config-ade20k-m2f-inference.yaml: 896 / 596 windows, 0.9-1.1 x flip (tasks/tta.py)

# (Meta key without the segmentation_model.N. prefix, our key), first match wins.
_ADAPTER_RULES = [
    (r"level_embed", r"adapter.level_embed"),
    (r"spm\.stem\.(\d+)\.(.+)", r"adapter.spatial_prior.stem.\1.\2"),
    (r"spm\.conv([234])\.(\d+)\.(.+)", lambda m: f"adapter.spatial_prior.down.{int(m[1]) - 2}.{m[2]}.{m[3]}"),
    (r"spm\.fc([1234])\.(.+)", lambda m: f"adapter.spatial_prior.proj.{int(m[1]) - 1}.{m[2]}"),
    (r"interactions\.(\d+)\.extractor\.ffn\.dwconv\.dwconv\.(.+)", r"adapter.blocks.\1.0.ffn.dwconv.\2"),
    (r"interactions\.(\d+)\.extractor\.(.+)", r"adapter.blocks.\1.0.\2"),
    (r"interactions\.(\d+)\.extra_extractors\.(\d+)\.ffn\.dwconv\.dwconv\.(.+)",
     lambda m: f"adapter.blocks.{m[1]}.{int(m[2]) + 1}.ffn.dwconv.{m[3]}"),
    (r"interactions\.(\d+)\.extra_extractors\.(\d+)\.(.+)", lambda m: f"adapter.blocks.{m[1]}.{int(m[2]) + 1}.{m[3]}"),
    (r"up\.(.+)", r"adapter.up.\1"),
    (r"norm([1234])\.(.+)", lambda m: f"adapter.norms.{int(m[1]) - 1}.{m[2]}"),
]
_HEAD_RULES = [
    (r"pixel_decoder\.input_convs\.(.+)", r"pixel_decoder.input_convs.\1"),
    (r"pixel_decoder\.encoder\.level_encoding", r"pixel_decoder.level_embed"),
    (r"pixel_decoder\.encoder\.encoder\.layers\.(.+)", r"pixel_decoder.layers.\1"),
    (r"pixel_decoder\.mask_feature\.(.+)", r"pixel_decoder.mask_features.\1"),
    (r"pixel_decoder\.(lateral|output)_convs\.(\d+)\.norm\.(.+)", r"pixel_decoder.\1_convs.\2.1.\3"),
    (r"pixel_decoder\.(lateral|output)_convs\.(\d+)\.(weight|bias)", r"pixel_decoder.\1_convs.\2.0.\3"),
    (r"predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.(.+)",
     r"transformer_decoder.self_attention_layers.\1.attn.\2"),
    (r"predictor\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)",
     r"transformer_decoder.cross_attention_layers.\1.attn.\2"),
    (r"predictor\.transformer_(self_attention|cross_attention|ffn)_layers\.(.+)", r"transformer_decoder.\1_layers.\2"),
    (r"predictor\.post_norm\.(.+)", r"transformer_decoder.decoder_norm.\1"),
    (r"predictor\.(query_feat|query_embed|level_embed|class_embed)\.(.+)", r"transformer_decoder.\1.\2"),
    (r"predictor\.mask_embed\.layers\.(\d+)\.(.+)", lambda m: f"transformer_decoder.mask_embed.{2 * int(m[1])}.{m[2]}"),
]


def matches(state: dict[str, torch.Tensor]) -> bool:
    """A Mask2Former segmentor: head keys ``segmentation_model.1.predictor.*`` or adapter keys ``...0.spm.*``."""
    return any(k.startswith((HEAD + "predictor.", ADAPTER + "spm.")) for k in state)


def _rename(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return None


def _count(state: dict, pattern: str) -> int:
    return len({m[1] for k in state if (m := re.fullmatch(pattern, k))})


def convert_state(state: dict[str, torch.Tensor], source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Meta's segmentor state dict -> (``Mask2FormerHead`` keyword arguments, state dict in our key names).

    Raises ``ExportError`` naming ``source`` and what was expected when the file is not such a segmentor.
    """
    backbone = sorted(k for k in state if k.startswith(ADAPTER + "backbone."))
    if backbone:
        raise ExportError(f"{source}: holds backbone weights ({backbone[0]}, ...); expected Meta's released "
                          "segmentor without its backbone: pass the backbone through backbone_weights instead")
    ours, unknown = {}, []
    for key, value in state.items():
        if key.startswith(ADAPTER):
            new = _rename(key[len(ADAPTER):], _ADAPTER_RULES)
        elif key.startswith(HEAD):
            new = _rename(key[len(HEAD):], _HEAD_RULES)
        else:
            new = None
        if new is None:
            unknown.append(key)
        else:
            ours[new] = value
    if unknown:
        raise ExportError(f"{source}: keys {unknown[:5]} are not those of Meta's M2F segmentor (expected "
                          f"{ADAPTER}{{level_embed,spm,interactions,up,norm1..4}}.* and "
                          f"{HEAD}{{pixel_decoder,predictor}}.*)")
    required = ["adapter.level_embed", "adapter.spatial_prior.stem.0.weight", "adapter.blocks.0.0.attn.value_proj.weight",
                "adapter.blocks.0.0.ffn.fc1.weight", "pixel_decoder.layers.0.self_attn.attention_weights.weight",
                "pixel_decoder.layers.0.linear1.weight", "transformer_decoder.query_feat.weight",
                "transformer_decoder.class_embed.weight", "transformer_decoder.ffn_layers.0.linear1.weight"]
    missing = [k for k in required if k not in ours]
    if missing:
        raise ExportError(f"{source}: incomplete M2F segmentor, no tensor for our {missing[:3]} (Meta's "
                          f"{ADAPTER}level_embed / spm / interactions and {HEAD}pixel_decoder / predictor expected)")

    embed_dim = ours["adapter.level_embed"].shape[1]
    num_queries, hidden_dim = ours["transformer_decoder.query_feat.weight"].shape
    ffn = ours["transformer_decoder.ffn_layers.0.linear1.weight"].shape[0]
    encoder_ffn = ours["pixel_decoder.layers.0.linear1.weight"].shape[0]
    if ffn != encoder_ffn:
        raise ExportError(f"{source}: pixel-decoder FFN width {encoder_ffn} != transformer-decoder FFN width {ffn} "
                          "(our head uses one dim_feedforward for both)")
    num_blocks = _count(state, re.escape(ADAPTER) + r"interactions\.(\d+)\..+")
    if num_blocks != 4:
        raise ExportError(f"{source}: {num_blocks} adapter interaction blocks, expected 4 (one per ViT layer)")
    adapter_rows = ours["adapter.blocks.0.0.attn.attention_weights.weight"].shape[0]
    encoder_rows = ours["pixel_decoder.layers.0.self_attn.attention_weights.weight"].shape[0]
    if adapter_rows % META_NUM_HEADS or encoder_rows % (3 * META_NUM_HEADS) or hidden_dim % META_NUM_HEADS:
        raise ExportError(f"{source}: attention shapes do not fit Meta's {META_NUM_HEADS} heads "
                          f"(adapter weights {adapter_rows} rows, encoder {encoder_rows} rows, hidden {hidden_dim})")
    head = {
        "_target_": "heads.mask2former.Mask2FormerHead",
        "hidden_dim": int(hidden_dim),
        "num_queries": int(num_queries),
        "num_heads": META_NUM_HEADS,
        "dim_feedforward": int(ffn),
        "dec_layers": _count(ours, r"transformer_decoder\.ffn_layers\.(\d+)\..+"),
        "enc_layers": _count(ours, r"pixel_decoder\.layers\.(\d+)\..+"),
        "deform_points": encoder_rows // (3 * META_NUM_HEADS),
        "neck": "adapter",
        "pixel_decoder_layout": "meta",
        "fp32_pixel_decoder": True,
        "adapter": {
            "conv_inplanes": int(ours["adapter.spatial_prior.stem.0.weight"].shape[0]),
            "num_heads": META_NUM_HEADS,
            "num_points": adapter_rows // META_NUM_HEADS,
            "value_ratio": ours["adapter.blocks.0.0.attn.value_proj.weight"].shape[0] / embed_dim,
            "ffn_ratio": ours["adapter.blocks.0.0.ffn.fc1.weight"].shape[0] / embed_dim,
            "extra_extractors": _count(ours, r"adapter\.blocks\.3\.(\d+)\..+") - 1,
        },
    }
    return head, ours


def convert(state: dict[str, torch.Tensor], spec, source: str) -> MetaHead:
    """``MetaFormat.convert``: the segmentor on a ViT backbone described by ``spec`` (Meta's four layers)."""
    if spec.kind != "vit":
        raise ExportError(f"{source}: Meta's M2F segmentor reads a ViT through its adapter; {spec.arch} is a {spec.kind}")
    head, ours = convert_state(state, source)
    num_classes = int(ours["transformer_decoder.class_embed.weight"].shape[0]) - 1
    names = list(ADE20K_CLASS_NAMES) if num_classes == len(ADE20K_CLASS_NAMES) else None
    return MetaHead(kind="segmentation", head=head, state=ours, out_indices=list(spec.out_indices),
                    num_classes=num_classes, class_names=names, eval=dict(META_EVAL))


META_SEGMENTOR = MetaFormat("meta_m2f_segmentor", matches, convert)
