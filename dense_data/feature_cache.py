"""Frozen-feature cache: backbone features of the training set written once, read back every later epoch.

With a frozen backbone and deterministic views, the backbone's forward gives the same features every epoch.
The cache holds ``views`` augmented views of each training image (view ``v`` of image ``i`` always uses the
pipeline seeded with ``(seed, i, v)``): each view's multi-layer maps and class tokens (float16 or bfloat16,
maps optionally mean-pooled to one vector per layer, which is all a linear classifier reads) and its
transformed targets (``mask``, ``depth``, ``label``).

On disk, one folder per key (backbone name + weights fingerprint, layers, pipeline, dataset, views, seed,
dtype, pooling, targets: a changed key is another folder) holding ``key.json``, ``layout.json`` and shards
``shard-J.bin`` (a 4 KiB header naming the key and the record layout, then fixed-size records, memory-mapped)
with ``shard-J.crc.npy`` (the CRC-32 of every record, -1 = not written yet). Sample ``s = i * views + v``
lives in shard ``s % num_shards``. A truncated shard, a shard of another key, a record whose CRC does not
match (with ``verify``) or one never written is (re)computed when the cache is prepared; a record whose CRC
does not match when it is read raises ``CacheError`` naming the file. Under DDP rank ``r`` computes the
shards ``J % world_size == r`` (no sample twice) and reads any shard, so the folder must be on a filesystem
every rank sees.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .transforms import Transformed, collate

FORMAT_VERSION = 1
MAGIC = b"DINOV3-HEADS-FEATURE-CACHE\n"
HEADER_BYTES = 4096
CACHED_TARGETS = ("mask", "depth", "label")
FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(RuntimeError):
    """A cache file that cannot be used (corrupt record, wrong layout)."""


# --------------------------------------------------------------------------------------------------- the key
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


# ------------------------------------------------------------------------------------------------ the layout
@dataclass(frozen=True)
class Field:
    """One array of a record: ``name``, numpy ``dtype`` string, ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))


def record_size(fields: Sequence[Field]) -> int:
    return sum(f.nbytes for f in fields)


def layout_fields(channels: Sequence[int], grid: Sequence[tuple[int, int]], has_cls: bool, pool: bool,
                  image_size: tuple[int, int], targets: Sequence[str], num_classes: int | None) -> list[Field]:
    """The record of one view: per layer its map (or pooled vector) and class token, then the targets."""
    fields = []
    for layer, (c, (h, w)) in enumerate(zip(channels, grid)):
        fields.append(Field(f"map{layer}", "<u2", (c,) if pool else (c, h, w)))  # float16 / bfloat16 bits
        if has_cls:
            fields.append(Field(f"cls{layer}", "<u2", (c,)))
    fields.append(Field("padded_size", "<i4", (2,)))
    fields.append(Field("image_size", "<i4", (2,)))
    if "mask" in targets:
        fields.append(Field("mask", "<u1" if (num_classes or 0) < 255 else "<i4", tuple(image_size)))
    if "depth" in targets:
        fields.append(Field("depth", "<f4", tuple(image_size)))
    if "label" in targets:
        fields.append(Field("label", "<i8", (1,)))
    return fields


def disk_bytes_per_view(channels: Sequence[int], grid: Sequence[tuple[int, int]], has_cls: bool = True,
                        pool: bool = False, image_size=(512, 512), targets=("mask",), num_classes=150) -> int:
    """Bytes one cached view takes on disk (the README's disk-cost table is computed with this)."""
    return record_size(layout_fields(channels, grid, has_cls, pool, image_size, targets, num_classes))


# ------------------------------------------------------------------------------------------------- the shards
class Shard:
    """One shard file: a header, ``num_records`` fixed-size records, and a CRC file beside it."""

    def __init__(self, path: Path, num_records: int, fields: Sequence[Field], hash_: str):
        self.path, self.crc_path = path, path.with_suffix(".crc.npy")
        self.num_records, self.fields, self.hash = num_records, list(fields), hash_
        self.record_size = record_size(fields)
        self.header = json.dumps({"format": FORMAT_VERSION, "key": hash_, "num_records": num_records,
                                  "fields": [[f.name, f.dtype, list(f.shape)] for f in fields]}).encode()
        if len(MAGIC) + len(self.header) + 1 > HEADER_BYTES:
            raise CacheError(f"record layout too long for the {HEADER_BYTES}-byte header of {path}")

    @property
    def expected_size(self) -> int:
        return HEADER_BYTES + self.num_records * self.record_size

    def problem(self) -> str | None:
        """Why the file cannot be reused as it is (missing, truncated, foreign), or None."""
        if not self.path.is_file():
            return "missing"
        size = self.path.stat().st_size
        if size != self.expected_size:
            return f"size {size} bytes, expected {self.expected_size} (truncated or another layout)"
        with open(self.path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
        if not head.startswith(MAGIC) or head[len(MAGIC):].rstrip(b"\n ") != self.header:
            return "header of another cache key, layout or format"
        return None

    def create(self) -> None:
        """A fresh file of the right size (records zero) and an all-missing CRC file."""
        with open(self.path, "wb") as handle:
            handle.write((MAGIC + self.header + b"\n").ljust(HEADER_BYTES, b" "))
            handle.truncate(self.expected_size)
        self.save_crcs(np.full(self.num_records, -1, dtype=np.int64))

    def load_crcs(self) -> np.ndarray:
        try:
            crcs = np.load(self.crc_path, allow_pickle=False)
        except (OSError, ValueError):
            return np.full(self.num_records, -1, dtype=np.int64)
        if crcs.shape != (self.num_records,) or crcs.dtype != np.int64:
            return np.full(self.num_records, -1, dtype=np.int64)
        return crcs

    def save_crcs(self, crcs: np.ndarray) -> None:
        tmp = self.crc_path.with_suffix(".tmp.npy")
        np.save(tmp, crcs)
        os.replace(tmp, self.crc_path)

    def records(self, mode: str = "r") -> np.memmap:
        """The records as a ``(num_records, record_size)`` uint8 memory map."""
        return np.memmap(self.path, dtype=np.uint8, mode=mode, offset=HEADER_BYTES,
                         shape=(self.num_records, self.record_size))


def _pack(fields: Sequence[Field], arrays: dict[str, np.ndarray]) -> np.ndarray:
    parts = []
    for f in fields:
        array = np.ascontiguousarray(arrays[f.name], dtype=f.dtype)
        if array.shape != f.shape:
            raise CacheError(f"{f.name} has shape {array.shape}, the cache layout {f.shape}: cached training views "
                             "must all have one size (a fixed crop)")
        parts.append(array.reshape(-1).view(np.uint8))
    return np.concatenate(parts)


def _unpack(fields: Sequence[Field], record: np.ndarray) -> dict[str, np.ndarray]:
    arrays, offset = {}, 0
    for f in fields:
        arrays[f.name] = record[offset:offset + f.nbytes].view(f.dtype).reshape(f.shape)
        offset += f.nbytes
    return arrays


# --------------------------------------------------------------------------------------------- seeded views
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


# --------------------------------------------------------------------------------------------------- reading
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
        arrays = _unpack(self.shards[j].fields, record)
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


# -------------------------------------------------------------------------------------------------- building
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _log(message: str) -> None:
    print(f"feature cache: {message}", file=sys.stderr, flush=True)


def _feature_bits(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    return tensor.detach().to(FEATURE_DTYPES[dtype]).view(torch.int16).cpu().numpy().view("<u2")


class FeatureCache:
    """Prepares (computes what is missing or bad) and opens the cache of one training set.

    Args:
        root: parent folder; the cache goes to ``root/<backbone>-<key hash>``.
        backbone_name: the backbone's config name (part of the key and the folder name).
        backbone: the frozen ``DinoBackbone`` (its weights are fingerprinted; it computes the features).
        dataset: the raw training set; pipeline, targets: the training pipeline and what the task trains on.
        views: augmented views per image; seed: seeds the views.
        dtype: ``float16`` or ``bfloat16``; pool: store each map's mean instead of the map (linear classifiers).
        num_classes: picks the mask's storage type (uint8 below 255 classes).
    """

    def __init__(self, root: str | Path, backbone_name: str, backbone: nn.Module, dataset: Dataset,
                 pipeline: A.BaseCompose, targets: Sequence[str], views: int = 1, seed: int = 0,
                 dtype: str = "float16", pool: bool = False, num_classes: int | None = None):
        if getattr(backbone, "freeze", None) != "frozen":
            raise ValueError(f"the feature cache needs a frozen backbone (backbone.freeze=frozen), "
                             f"got freeze={getattr(backbone, 'freeze', None)!r}")
        unsupported = sorted(set(targets) - set(CACHED_TARGETS))
        if unsupported:
            raise ValueError(f"the feature cache stores {CACHED_TARGETS} targets, not {unsupported}")
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"data.cache.dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
        if views < 1:
            raise ValueError(f"data.cache.views must be >= 1, got {views}")
        self.backbone, self.views, self.dtype, self.pool = backbone, views, dtype, pool
        self.targets, self.num_classes = tuple(targets), num_classes
        self.key = cache_key(backbone_name, backbone, pipeline, dataset, targets, views, seed, dtype, pool)
        self.hash = key_hash(self.key)
        self.folder = Path(root) / f"{backbone_name}-{self.hash[:16]}"
        self.source = SeededViews(dataset, pipeline, targets, views, seed)

    # ------------------------------------------------------------------ layout
    def _layout(self, device: torch.device, autocast: Callable) -> list[Field]:
        sample = self.source[0]
        with torch.no_grad(), autocast():
            features = self.backbone(sample["image"][None].to(device))
        grid = [tuple(m.shape[-2:]) for m in features.maps]
        return layout_fields(features.channels, grid, features.cls is not None, self.pool,
                             tuple(sample["meta"]["image_size"]), self.targets, self.num_classes)

    def _shards(self, fields: list[Field], num_shards: int) -> list[Shard]:
        total = len(self.source)
        return [Shard(self.folder / f"shard-{j:04d}.bin", len(range(j, total, num_shards)), fields, self.hash)
                for j in range(num_shards)]

    def _agree_on_layout(self, fields: list[Field], world: int, rank: int) -> int:
        """Rank 0 writes ``key.json`` / ``layout.json`` (a foreign or stale folder is reset); returns the shard count."""
        layout = {"num_samples": len(self.source), "fields": [[f.name, f.dtype, list(f.shape)] for f in fields]}
        key_file, layout_file = self.folder / "key.json", self.folder / "layout.json"
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                stored_key = json.loads(key_file.read_text())
                stored = json.loads(layout_file.read_text())
            except (OSError, ValueError):
                stored_key, stored = None, None
            if stored_key != self.key or stored is None or {k: stored.get(k) for k in layout} != layout:
                if stored_key is not None:
                    _log(f"{self.folder} holds another key or layout: rebuilding it")
                for old in self.folder.glob("shard-*"):
                    old.unlink()
                key_file.write_text(json.dumps(self.key, indent=1, sort_keys=True) + "\n")
                layout_file.write_text(json.dumps({**layout, "num_shards": world}, indent=1) + "\n")
        _barrier()
        return int(json.loads(layout_file.read_text())["num_shards"])

    # ------------------------------------------------------------------- build
    def prepare(self, device: torch.device | str = "cpu", batch_size: int = 8, num_workers: int = 0,
                verify: bool = True, autocast: Callable = nullcontext) -> CachedFeatures:
        """Compute this rank's missing or bad records, wait for every rank, and open the cache for reading.

        ``verify`` re-checks the CRC of every record already written (one sequential read of this rank's
        shards); without it only the file size and header are checked. ``autocast`` is the context the
        backbone runs in (the trainer's precision).
        """
        device = torch.device(device)
        rank, world = _rank_world()
        # Whether records had to be computed or not, training draws the same random numbers afterwards.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            fields = self._layout(device, autocast)
            num_shards = self._agree_on_layout(fields, world, rank)
            shards = self._shards(fields, num_shards)
            for j in range(rank, num_shards, world):
                self._fill(shards[j], j, num_shards, device, batch_size, num_workers, verify, autocast)
        _barrier()
        return CachedFeatures(self.folder, shards, len(self.source), self.views, self.dtype, self.pool)

    def _fill(self, shard: Shard, j: int, num_shards: int, device: torch.device, batch_size: int,
              num_workers: int, verify: bool, autocast: Callable) -> None:
        problem = shard.problem()
        if problem is not None:
            if problem != "missing":
                _log(f"{shard.path}: {problem}; rebuilding it")
            shard.create()
        crcs = shard.load_crcs()
        records = shard.records("r+")
        if verify:
            for local in np.flatnonzero(crcs >= 0):
                if zlib.crc32(records[local]) != crcs[local]:
                    _log(f"{shard.path}: record {local} does not match its checksum; recomputing it")
                    crcs[local] = -1
        todo = np.flatnonzero(crcs < 0)
        if len(todo) == 0:
            return
        _log(f"computing {len(todo)} of {shard.num_records} views of {shard.path}")
        samples = [int(j + local * num_shards) for local in todo]
        loader = DataLoader(Subset(self.source, samples), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate)
        done = 0
        for batch in loader:
            with torch.no_grad(), autocast():
                features = self.backbone(batch["image"].to(device))
            for b, meta in enumerate(batch["meta"]):
                local = meta["sample"] // num_shards
                arrays = {"padded_size": np.asarray(features.padded_size), "image_size": np.asarray(meta["image_size"])}
                for layer, fmap in enumerate(features.maps):
                    value = fmap[b].float()
                    arrays[f"map{layer}"] = _feature_bits(value.mean(dim=(1, 2)) if self.pool else value, self.dtype)
                    if features.cls is not None:
                        arrays[f"cls{layer}"] = _feature_bits(features.cls[layer][b].float(), self.dtype)
                for key in ("mask", "depth", "label"):
                    if key in self.targets:
                        arrays[key] = np.atleast_1d(batch[key][b].numpy()) if key == "label" else batch[key][b].numpy()
                record = _pack(shard.fields, arrays)
                records[local] = record
                crcs[local] = zlib.crc32(record)
            done += len(batch["meta"])
            if done % (batch_size * 64) < batch_size:
                records.flush()
                shard.save_crcs(crcs)
        records.flush()
        shard.save_crcs(crcs)


def cached_training_set(datamodule, trainer) -> CachedFeatures:
    """The datamodule's training set through the cache (``data.cache``), prepared with the trainer's model.

    Called from ``DenseDataModule.train_dataloader`` once the model sits on its device (and DDP is up).
    """
    options = dict(datamodule.cache)
    module = trainer.lightning_module
    backbone_name = module.hparams["backbone"]["name"]
    pool = options.get("pool")
    pool = set(datamodule.targets) == {"label"} if pool is None else bool(pool)
    cache = FeatureCache(options["root"], backbone_name, module.backbone, datamodule.train_set,
                         datamodule.train_pipeline, datamodule.targets, views=int(options.get("views", 1)),
                         seed=int(options.get("seed", 0)), dtype=options.get("dtype", "float16"), pool=pool,
                         num_classes=datamodule.num_classes)
    return cache.prepare(module.device, batch_size=int(options.get("batch_size") or datamodule.batch_size),
                         num_workers=datamodule.num_workers, verify=bool(options.get("verify", True)),
                         autocast=trainer.precision_plugin.forward_context)
