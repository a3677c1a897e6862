"""The datasets around the cache: the seeded views it is computed from, and the cached records read back."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from ..transforms import Transformed
from .shards import FEATURE_DTYPES, CacheError, Shard, unpack


class SeededViews(Dataset):
    """``views`` augmented views of each image: item ``s`` is view ``s % views`` of image ``s // views``,
    transformed by the pipeline seeded with ``(seed, image, view)``, so it is the same every time."""

    def __init__(self, dataset: Dataset, pipeline: A.BaseCompose, targets: Sequence[str], views: int, seed: int):
        self.transformed = Transformed(dataset, copy.deepcopy(pipeline), tuple(targets), resize_labels=True)
        self.views, self.seed = views, seed

    def __len__(self) -> int:
        return len(self.transformed) * self.views

    def __getitem__(self, sample: int) -> dict:
        index, view = divmod(sample, self.views)
        seed = int(np.random.SeedSequence([self.seed, index, view]).generate_state(1)[0])
        self.transformed.transform.set_random_seed(seed)
        item = self.transformed[index]
        item["meta"]["sample"] = sample
        return item


class CachedFeatures(Dataset):
    """The cached training set: item ``s`` (view ``s % views`` of image ``s // views``) as a sample dict with
    ``features`` (``maps``: ``(C, h, w)`` per layer, or ``(C, 1, 1)`` if pooled; ``cls``: ``(C,)`` per layer
    or absent), the targets and ``meta`` (``image_size``, ``padded_size``, ``index``, ``view``)."""

    def __init__(self, folder: Path, shards: list[Shard], num_samples: int, views: int, dtype: str, pool: bool):
        self.folder, self.shards, self.num_samples = folder, shards, num_samples
        self.views, self.dtype, self.pool = views, dtype, pool
        self._open: dict[int, tuple[np.memmap, np.ndarray]] = {}

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return self.num_samples

    def _shard(self, j: int) -> tuple[np.memmap, np.ndarray]:
        if j not in self._open:
            self._open[j] = (self.shards[j].records("r"), self.shards[j].load_crcs())
        return self._open[j]

    def __getitem__(self, sample: int | tuple[int, int]) -> dict:
        if isinstance(sample, tuple):  # (index, augmentation seed) from ResumableSampler: views are already fixed
            sample = sample[0]
        j, local = sample % len(self.shards), sample // len(self.shards)
        records, crcs = self._shard(j)
        record = np.array(records[local])
        if zlib.crc32(record) != crcs[local]:
            raise CacheError(f"feature cache record {local} of {self.shards[j].path} does not match its checksum "
                             "(file changed or corrupt): run again, preparing the cache recomputes it")
        arrays = unpack(self.shards[j].fields, record)
        dtype = FEATURE_DTYPES[self.dtype]
        maps, cls, layer = [], [], 0
        while f"map{layer}" in arrays:
            values = torch.from_numpy(arrays[f"map{layer}"].view(np.int16).copy()).view(dtype)
            maps.append(values[:, None, None] if self.pool else values)
            if f"cls{layer}" in arrays:
                cls.append(torch.from_numpy(arrays[f"cls{layer}"].view(np.int16).copy()).view(dtype))
            layer += 1
        index, view = divmod(sample, self.views)
        item = {"features": {"maps": maps, **({"cls": cls} if cls else {})},
                "meta": {"index": index, "view": view, "image_size": tuple(arrays["image_size"].tolist()),
                         "padded_size": tuple(arrays["padded_size"].tolist())}}
        if "mask" in arrays:
            item["mask"] = torch.from_numpy(arrays["mask"].astype(np.int64))
        if "depth" in arrays:
            item["depth"] = torch.from_numpy(arrays["depth"].copy())
        if "label" in arrays:
            item["label"] = torch.tensor(int(arrays["label"][0]))
        return item


def collate_cached(samples: list[dict]) -> dict:
    """Stack cached samples (all of one size): ``features`` maps ``(B, C, h, w)``, cls ``(B, C)``, targets."""
    first = samples[0]["features"]
    features = {"maps": [torch.stack([s["features"]["maps"][i] for s in samples]) for i in range(len(first["maps"]))]}
    if "cls" in first:
        features["cls"] = [torch.stack([s["features"]["cls"][i] for s in samples]) for i in range(len(first["cls"]))]
    batch = {"features": features, "meta": [s["meta"] for s in samples]}
    for key in ("mask", "depth", "label"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch
