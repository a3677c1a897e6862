"""Meta's recorded inputs and outputs, kept as compressed numpy arrays (``.npz``) next to the weight manifests.

The parity fixtures hold no weights (those are rebuilt from ``seeded_weights`` manifests): only the inputs a
fixture script fed to Meta's code and the outputs it got, which a test compares against ours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_arrays(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write ``{name: tensor}`` to ``path`` (``.npz``, compressed); dtypes and shapes are kept exactly."""
    np.savez_compressed(path, **{name: t.detach().cpu().contiguous().numpy() for name, t in tensors.items()})


def load_arrays(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` written by :func:`save_arrays`."""
    with np.load(path, allow_pickle=False) as arrays:
        return {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
