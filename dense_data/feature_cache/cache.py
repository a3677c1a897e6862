"""Preparing the cache: compute a rank's missing or bad records under DDP, then open it; the datamodule's entry."""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..transforms import collate
from .datasets import CachedFeatures, SeededViews
from .key import cache_key, key_hash
from .shards import FEATURE_DTYPES, Field, Shard, layout_fields, pack

CACHED_TARGETS = ("mask", "depth", "label")


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
                record = pack(shard.fields, arrays)
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
