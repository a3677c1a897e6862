"""Find DINOv3 weights (timm tag, Hugging Face id, local file) and load them into a timm model.

Every source ends as a local file. Three key layouts are understood and told apart by their keys:
Meta's (``storage_tokens``, ``blocks.0.ls1.gamma``), timm's (``reg_token``, ``blocks.0.gamma_1``) and
Hugging Face ``transformers``' (``embeddings.patch_embeddings.weight``, ``layer.0.attention.q_proj``).
"""

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models import convnext, eva, get_pretrained_cfg
from torch import nn

from .registry import BackboneSpec

HUB_TIMEOUT_S = 4.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsError(RuntimeError):
    """Weights that cannot be found, fetched or fitted to the backbone."""


def resolve_weights(weights: str, spec: BackboneSpec) -> Path:
    """Turn a weights argument into a local file.

    Args:
        weights: ``"timm"`` (the spec's timm tag), ``"hf"`` (the spec's Hugging Face id), a bare timm tag
            such as ``"lvd1689m"``, a hub repository id (``"facebook/dinov3-vitl16-pretrain-lvd1689m"``,
            ``"timm/vit_large_patch16_dinov3_qkvb.lvd1689m"``), or a local ``.pth``/``.safetensors``/folder.
    """
    path = Path(os.path.expanduser(weights))
    if path.exists():
        return _weights_file_in(path) if path.is_dir() else path
    if weights.startswith((".", "/", "~")) or path.suffix in {".pth", ".pt", ".safetensors", ".bin"}:
        raise WeightsError(f"weights file not found: {path}")
    if weights == "hf":
        if spec.hf_id is None:
            raise WeightsError(f"no Hugging Face weights are published for {spec.arch}")
        return _download(spec.hf_id)
    if "/" in weights:
        return _download(weights)
    tag = spec.timm_tag if weights == "timm" else weights
    if tag is None:
        raise WeightsError(f"no timm pretrained tag is known for {spec.arch}; pass a local file")
    cfg = get_pretrained_cfg(f"{spec.arch}.{tag}")
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsError(f"timm has no pretrained weights {spec.arch}.{tag}")
    return _download(cfg.hf_hub_id)


def _weights_file_in(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    raise WeightsError(f"no {' or '.join(WEIGHT_FILES)} in {folder}")


def _download(repo_id: str) -> Path:
    """Fetch a repository's weight file, failing in seconds with the remedy when the hub cannot serve it."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    remedy = ("accept the licence on its Hugging Face page and run `hf auth login`, "
              "or download it and pass the local path as weights=PATH")
    for name in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, name, local_files_only=True))
        except Exception:
            pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise WeightsError(f"weights {repo_id!r} are not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                           f"downloading them: unset HF_HUB_OFFLINE to download, or pass a local path as weights=PATH")
    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S, files_metadata=False)
    except GatedRepoError as err:
        raise WeightsError(f"weights {repo_id!r} are gated: {remedy}") from err
    except RepositoryNotFoundError as err:
        raise WeightsError(f"no repository {repo_id!r} on the Hugging Face hub (or it is gated): {remedy}") from err
    except Exception as err:
        raise WeightsError(f"cannot reach the Hugging Face hub for {repo_id!r} ({type(err).__name__}: {err}); "
                           "check the network, or download the weights elsewhere and pass the local path "
                           "as weights=PATH") from err
    files = {s.rfilename for s in info.siblings or []}
    name = next((n for n in WEIGHT_FILES if n in files), None)
    if name is None:
        raise WeightsError(f"repository {repo_id!r} holds none of {WEIGHT_FILES}")
    try:
        return Path(hf_hub_download(repo_id, name))
    except GatedRepoError as err:
        raise WeightsError(f"weights {repo_id!r} are gated: {remedy}") from err


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file or a (trusted-format-only) torch checkpoint."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read weights from {path}: {err}") from err
    for key in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("backbone.") for k in state):  # Meta training-run checkpoints
        state = {k[len("backbone."):]: v for k, v in state.items()}
    return state


def to_timm_keys(state: dict[str, torch.Tensor], model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """Convert a Meta, Hugging Face or timm state dict to the timm model's key layout."""
    if any("embeddings.patch_embeddings" in k for k in state) or any(".layer.0." in f".{k}" for k in state):
        if kind != "vit":
            raise WeightsError("Hugging Face-format ConvNeXt weights are not supported; "
                               "pass Meta's .pth or timm's weights (weights=timm)")
        return _hf_vit_to_timm(state)
    if kind == "vit":
        return eva.checkpoint_filter_fn(state, model)
    return convnext.checkpoint_filter_fn(state, model)


_HF_VIT_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.gamma_\2"),
    (r"^layer\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.fc1."),  # renamed to fc1_x below for gated MLPs
    (r"^layer\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.fc1_g."),
    (r"^layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^norm\.", "norm."),
]


def _hf_vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {re.sub(r"^(dinov3\.|model\.)", "", k): v for k, v in state.items()}
    gated = any(".mlp.gate_proj." in k for k in state)
    out = {}
    for key, value in state.items():
        if key == "embeddings.mask_token" or ".attention.q_proj" in key or ".attention.k_proj" in key \
                or ".attention.v_proj" in key:
            continue
        new = key
        for pattern, repl in _HF_VIT_RENAMES:
            new = re.sub(pattern, repl, new)
        if gated:
            new = new.replace(".mlp.fc1.", ".mlp.fc1_x.")
        out[new] = value
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"layer\.(\d+)\.", k))})
    for i in blocks:
        attn = f"layer.{i}.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [state[attn + f"{p}_proj.weight"] for p in "qkv"], dim=0)
        if attn + "q_proj.bias" in state:
            out[f"blocks.{i}.attn.q_bias"] = state[attn + "q_proj.bias"]
            out[f"blocks.{i}.attn.v_bias"] = state[attn + "v_proj.bias"]
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a converted state dict strictly, naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        problems = []
        if shapes:
            problems.append(f"shape mismatch: {show(shapes)}")
        if missing:
            problems.append(f"missing keys: {show(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {show(unexpected)}")
        raise WeightsError(f"weights {source} do not fit this backbone ({type(model).__name__}): "
                           + "; ".join(problems) + ". Is this checkpoint for another architecture or size?")
    model.load_state_dict(state, strict=True)

