"""Meta's released depther files -> ``DPTHead`` (config + state dict in our key names).

Two formats, both a flat state dict of Meta's ``DPTHead`` (``dinov3/eval/depth/models/dpt_head.py``), which the hub
loads strictly into ``depther.decoder`` (``dinov3/hub/depthers.py``):

- ``meta_depther`` (``dinov3_vit7b16_dd``, SYNTHMIX): BatchNorm before each projection, bias-free residual convs,
  post-fusion 3x3 conv + ReLU, no class token; 256 bins ``linspace(0.001, 100, 256)`` with ``relu + 0.1`` weights.
- ``meta_chmv2`` (``dinov3_vitl16_chmv2``, canopy height): class-token readout ``project``, biased residual convs,
  no post-fusion conv, no BatchNorm, hidden 128; mixlog bins over [0.001, 96] m; layers [5, 11, 17, 23].

Widths (backbone channels, post-projection channels, fusion width, hidden channels, bins) are read from the
tensor shapes; what shapes cannot tell (depth range, bin mapping, layers) is the hub's configuration of that file.
"""

from __future__ import annotations

import re

import torch

from tasks.meta_heads import MetaFormat, MetaHead
from tasks.predictor import ExportError

_PREFIXES = ("reassemble_blocks.", "convs.", "fusion_blocks.", "project.", "conv_depth.")
_RULES = (
    (r"reassemble_blocks\.projects\.(\d)\.conv\.(weight|bias)", lambda i, p: f"reassemble.{i}.project.{p}"),
    (r"reassemble_blocks\.resize_layers\.(\d)\.(weight|bias)", lambda i, p: f"reassemble.{i}.resize.{p}"),
    (r"reassemble_blocks\.batchnorm_layers\.(\d)\.(\w+)", lambda i, p: f"reassemble.{i}.norm.{p}"),
    (r"reassemble_blocks\.readout_projects\.(\d)\.0\.(weight|bias)", lambda i, p: f"reassemble.{i}.readout_project.0.{p}"),
    (r"convs\.(\d)\.conv\.(weight)", lambda i, p: f"reassemble.{i}.layer_rn.{p}"),
    (r"fusion_blocks\.(\d)\.project\.conv\.(weight|bias)", lambda i, p: f"fusion.{3 - int(i)}.project.{p}"),
    (r"fusion_blocks\.(\d)\.res_conv_unit1\.conv([12])\.conv\.(weight|bias)",
     lambda i, c, p: f"fusion.{3 - int(i)}.skip_unit.conv{c}.{p}"),
    (r"fusion_blocks\.(\d)\.res_conv_unit2\.conv([12])\.conv\.(weight|bias)",
     lambda i, c, p: f"fusion.{3 - int(i)}.unit.conv{c}.{p}"),
    (r"project\.conv\.(weight|bias)", lambda p: f"fusion_conv.{p}"),
    (r"conv_depth\.head\.0\.(weight|bias)", lambda p: f"head_conv1.{p}"),
    (r"conv_depth\.head\.2\.(weight|bias)", lambda p: f"head_conv2.{p}"),
    (r"conv_depth\.head\.4\.(weight|bias)", lambda p: f"head_out.{p}"),
)


def is_meta_dpt(state: dict[str, torch.Tensor]) -> bool:
    """Keys of Meta's ``DPTHead`` state dict (reassemble blocks, fusion blocks and the up-conv head)."""
    return (any(k.startswith("reassemble_blocks.projects.") for k in state)
            and any(k.startswith("fusion_blocks.") for k in state)
            and "conv_depth.head.4.weight" in state and all(k.startswith(_PREFIXES) for k in state))


def _is_chmv2(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("reassemble_blocks.readout_projects.") for k in state) and "project.conv.weight" not in state


def convert_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Meta's key names -> ours (``heads.dpt.DPTHead``); a key no rule knows raises ``ExportError`` naming it."""
    out = {}
    for key, value in state.items():
        for pattern, name in _RULES:
            match = re.fullmatch(pattern, key)
            if match:
                out[name(*match.groups())] = value
                break
        else:
            raise ExportError(f"{source}: key {key!r} is not part of Meta's DPT head layout")
    return out


def head_config(state: dict[str, torch.Tensor], source: str) -> dict:
    """``DPTHead`` arguments read from the shapes of Meta's DPT state dict."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ExportError(f"{source}: Meta's DPT head file lacks {key!r}")
        return tuple(state[key].shape)

    in_channels = [shape(f"reassemble_blocks.projects.{i}.conv.weight")[1] for i in range(4)]
    post_channels = [shape(f"reassemble_blocks.projects.{i}.conv.weight")[0] for i in range(4)]
    if len(set(in_channels)) != 1:
        raise ExportError(f"{source}: projections read {in_channels} channels; Meta's DPT reads one ViT width")
    num_out = shape("conv_depth.head.4.weight")[0]
    return {
        "_target_": "heads.dpt.DPTHead",
        "readout": "project" if "reassemble_blocks.readout_projects.0.0.weight" in state else "ignore",
        "features": shape("convs.0.conv.weight")[0],
        "post_channels": post_channels,
        "output": "bins" if num_out > 1 else "regression",
        "activation": "relu",
        "num_bins": num_out if num_out > 1 else 256,
        "head_hidden": shape("conv_depth.head.2.weight")[0],
        "batchnorm": "reassemble_blocks.batchnorm_layers.0.weight" in state,
        "residual_bias": "fusion_blocks.0.res_conv_unit2.conv1.conv.bias" in state,
        "fusion_conv": "project.conv.weight" in state,
        "fusion_upsample": "x2",
        "input_padding": "center",
    }


def _convert(state: dict[str, torch.Tensor], spec, source: str, chmv2: bool) -> MetaHead:
    if spec.kind != "vit":
        raise ExportError(f"{source}: Meta's depther reads ViT layers; backbone kind is {spec.kind!r}")
    head = head_config(state, source)
    if chmv2:
        head.update(min_depth=0.001, max_depth=96.0, bin_placement="mixlog", bin_norm="mixlog")
        out_indices = [i * spec.depth // 4 - 1 for i in range(1, 5)]
    else:
        head.update(min_depth=0.001, max_depth=100.0, bin_placement="linspace", bin_norm="linear")
        out_indices = list(spec.out_indices)
    # the backbone's width is checked when the state is loaded into a head built on that backbone
    return MetaHead(kind="depth", head=head, state=convert_keys(state, source), out_indices=out_indices,
                    eval={"mode": "whole", "flip": True})


def convert_depther(state: dict[str, torch.Tensor], spec, source: str) -> MetaHead:
    """Meta's released DPT depther (``dinov3_vit7b16_dd``) -> ``MetaHead``."""
    return _convert(state, spec, source, chmv2=False)


def convert_chmv2(state: dict[str, torch.Tensor], spec, source: str) -> MetaHead:
    """Meta's CHMv2 canopy-height head (``dinov3_vitl16_chmv2``) -> ``MetaHead``."""
    return _convert(state, spec, source, chmv2=True)


DEPTHER = MetaFormat("meta_depther", lambda s: is_meta_dpt(s) and not _is_chmv2(s), convert_depther)
CHMV2 = MetaFormat("meta_chmv2", lambda s: is_meta_dpt(s) and _is_chmv2(s), convert_chmv2)
