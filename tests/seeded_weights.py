"""Seeded weights: a small manifest of (key, shape, dtype) stands in for a committed weight file.

Meta-parity fixtures need Meta's modules to run on known weights, and the tests need the same weights in Meta's
file layout. Instead of committing the weight files, a fixture script (``tools/meta_fixtures/*.py``) fills Meta's
module with :func:`state_dict_from` of a manifest, runs it, and commits the manifest (JSON) with Meta's inputs and
outputs; a test rebuilds the identical state dict from the manifest and writes it where the loader expects a file.

Every tensor is drawn from its own generator, seeded by the manifest's seed and the tensor's key, so values do not
depend on the order of keys or on torch's global RNG. Magnitudes are those of a trained network (``1/sqrt(fan_in)``
for matrices and kernels, norm scales near 1, small biases) so that no layer saturates or vanishes. Buffers whose
values carry meaning (RoPE periods, a ``num_batches_tracked`` count) are kept verbatim in the manifest as
``literal`` entries.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

NEAR_ONE = ("weight", "running_var", "gamma", "scale")


def seeded_tensor(key: str, shape: list[int] | tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The tensor for ``key``: same key, shape, dtype and seed give the same values on every machine."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    shape = tuple(shape)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        values = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    elif key.rsplit(".", 1)[-1].endswith(NEAR_ONE):
        values = 0.5 + torch.rand(shape, generator=generator)
    else:
        values = 0.1 * torch.randn(shape, generator=generator)
    return values.to(dtype)


def manifest_of(state_dict: dict[str, torch.Tensor], seed: int, literal: tuple[str, ...] = ()) -> dict:
    """Describe ``state_dict`` by keys, shapes and dtypes; the keys in ``literal`` keep their values."""
    unknown = sorted(set(literal) - set(state_dict))
    if unknown:
        raise KeyError(f"literal keys not in the state dict: {unknown}")
    tensors, kept = {}, {}
    for key, value in state_dict.items():
        entry = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        if key in literal:
            kept[key] = dict(entry, values=value.flatten().tolist())
        else:
            tensors[key] = entry
    return {"seed": seed, "tensors": tensors, "literal": kept}


def state_dict_from(manifest: dict) -> dict[str, torch.Tensor]:
    """The state dict a manifest describes, in the manifest's key order (seeded tensors, then literals)."""
    seed = manifest["seed"]
    state = {key: seeded_tensor(key, entry["shape"], getattr(torch, entry["dtype"]), seed)
             for key, entry in manifest["tensors"].items()}
    for key, entry in manifest.get("literal", {}).items():
        dtype = getattr(torch, entry["dtype"])
        state[key] = torch.tensor(entry["values"], dtype=dtype).reshape(entry["shape"])
    return state


def seeded_state_dict(state_dict: dict[str, torch.Tensor], seed: int,
                      literal: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """Seeded replacement values for ``state_dict`` and the manifest that rebuilds them (for fixture scripts)."""
    manifest = manifest_of(state_dict, seed, literal)
    return state_dict_from(manifest), manifest


def write_manifest(manifest: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(manifest, indent=None, separators=(",", ":")) + "\n")


def read_manifest(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_meta_file(manifest_path: str | Path, folder: str | Path) -> Path:
    """Save the state dict of ``NAME.manifest.json`` as ``folder/NAME.pth`` in Meta's layout: flat, or inside the
    wrapper the manifest's optional ``file`` entry names (``{"state_under": "model", "with": {...}}``)."""
    manifest = read_manifest(manifest_path)
    state, layout = state_dict_from(manifest), manifest.get("file")
    path = Path(folder) / (Path(manifest_path).name.removesuffix(".manifest.json") + ".pth")
    torch.save(state if layout is None else {layout["state_under"]: state, **layout["with"]}, path)
    return path
