"""The cache key: what the cached values depend on (weights and dataset fingerprints included) and its hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
from torch import nn
from torch.utils.data import Dataset

from .shards import FORMAT_VERSION


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over every tensor's name, shape, dtype and values (tensors over 2^16 values: 2^16 strided samples).

    Any change of weights (another checkpoint, a fine-tuned block) changes most values of the affected
    tensors, so the sample catches it; hashing every byte of a 7B model would take minutes.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 65536)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _describe(value, depth: int = 0):
    """A JSON-able description of a dataset's configuration (its plain attributes, recursively)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_describe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(value.items())}
    if isinstance(value, Dataset) and depth < 3:
        attrs = {k: _describe(v, depth + 1) for k, v in sorted(vars(value).items()) if not k.startswith("_")}
        return {"class": f"{type(value).__module__}.{type(value).__qualname__}", **attrs}
    return f"<{type(value).__qualname__}>"


def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the dataset's class, length and plain attributes (file lists, sizes, seeds)."""
    text = json.dumps({"len": len(dataset), "dataset": _describe(dataset)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(backbone_name: str, backbone: nn.Module, pipeline: A.BaseCompose, dataset: Dataset,
              targets: Sequence[str], views: int, seed: int, dtype: str, pool: bool) -> dict:
    """Everything the cached values depend on (as JSON reads it back); its hash names the cache folder."""
    key = {
        "format": FORMAT_VERSION,
        "backbone": backbone_name,
        "weights": weights_fingerprint(backbone),
        "out_indices": list(backbone.out_indices),
        "pipeline": A.to_dict(pipeline),
        "dataset": dataset_fingerprint(dataset),
        "targets": sorted(targets),
        "views": views,
        "seed": seed,
        "dtype": dtype,
        "pool": pool,
    }
    return json.loads(json.dumps(key, sort_keys=True))


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
