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

Modules: ``key`` (the key and its fingerprints), ``shards`` (record layout, shard files), ``datasets`` (seeded
views, cached records read back), ``cache`` (preparing the cache, the datamodule's entry).
"""

from .cache import CACHED_TARGETS, FeatureCache, cached_training_set
from .datasets import CachedFeatures, SeededViews, collate_cached
from .key import cache_key, dataset_fingerprint, key_hash, weights_fingerprint
from .shards import (
    FEATURE_DTYPES,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    CacheError,
    Field,
    Shard,
    disk_bytes_per_view,
    layout_fields,
    record_size,
)

__all__ = [
    "CACHED_TARGETS",
    "FEATURE_DTYPES",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "CacheError",
    "CachedFeatures",
    "FeatureCache",
    "Field",
    "SeededViews",
    "Shard",
    "cache_key",
    "cached_training_set",
    "collate_cached",
    "dataset_fingerprint",
    "disk_bytes_per_view",
    "key_hash",
    "layout_fields",
    "record_size",
    "weights_fingerprint",
]
