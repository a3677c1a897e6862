"""The on-disk record layout (fields of one view, their sizes) and the shard files that hold the records."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
MAGIC = b"DINOV3-HEADS-FEATURE-CACHE\n"
HEADER_BYTES = 4096
FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(RuntimeError):
    """A cache file that cannot be used (corrupt record, wrong layout)."""


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


def pack(fields: Sequence[Field], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """One record's bytes: the arrays named by ``fields``, in their order and dtypes."""
    parts = []
    for f in fields:
        array = np.ascontiguousarray(arrays[f.name], dtype=f.dtype)
        if array.shape != f.shape:
            raise CacheError(f"{f.name} has shape {array.shape}, the cache layout {f.shape}: cached training views "
                             "must all have one size (a fixed crop)")
        parts.append(array.reshape(-1).view(np.uint8))
    return np.concatenate(parts)


def unpack(fields: Sequence[Field], record: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of one record (views into its bytes), by field name."""
    arrays, offset = {}, 0
    for f in fields:
        arrays[f.name] = record[offset:offset + f.nbytes].view(f.dtype).reshape(f.shape)
        offset += f.nbytes
    return arrays
