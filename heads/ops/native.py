"""Small C++ kernels for CPUs (``heads/ops/csrc/*.cpp``), built on first use and called through ``ctypes``.

Each source is plain C++ without torch headers (about a second to build) exporting ``extern "C"`` functions of
pointers and integers. ``torch.utils.cpp_extension`` builds it with the machine's C++ compiler and ``ninja`` (a
dependency), caches it under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in a folder per source,
torch version and flags, and rebuilds it when the source changes; on x86-64 with GCC one build holds AVX-512, AVX2 and
baseline versions, chosen when it loads. ``ctypes`` releases the GIL during a call, so ``run_parts`` spreads work
over ``torch.get_num_threads()`` Python threads. ``kernel()`` is ``None``, with a warning, where a source cannot be
built (no C++ compiler), and without one when the environment sets ``DINOV3_HEADS_CPU_KERNELS=0``: callers then take
their PyTorch way, which gives the same numbers more slowly.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import torch

CSRC = Path(__file__).parent / "csrc"
SWITCH = "DINOV3_HEADS_CPU_KERNELS"  # "0": never build or use the compiled kernels
POINTER, INT, INT32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


def kernel(source: str, function: str, argtypes: tuple, flags: tuple[str, ...] = ()):
    """``function`` of ``csrc/<source>.cpp`` built with extra compiler ``flags`` (none: every version), typed with
    ``argtypes`` and returning an ``int`` status; ``None`` where it cannot be built or ``SWITCH`` is "0"."""
    return None if os.environ.get(SWITCH, "1") == "0" else _entry(source, function, argtypes, flags)


@lru_cache(maxsize=None)
def _entry(source: str, function: str, argtypes: tuple, flags: tuple[str, ...]):
    library = _build(source, flags)
    if library is None:
        return None
    entry = getattr(library, function)
    entry.restype, entry.argtypes = ctypes.c_int, list(argtypes)
    return entry


@contextmanager
def switched_off() -> Iterator[None]:
    """Within the block, every operation takes its PyTorch way (``SWITCH`` set to "0", restored after)."""
    before, os.environ[SWITCH] = os.environ.get(SWITCH), "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[SWITCH]
        else:
            os.environ[SWITCH] = before


@lru_cache(maxsize=None)
def _build(source: str, flags: tuple[str, ...]):
    path = CSRC / f"{source}.cpp"
    # one build folder per torch version too: torch 2.11 waits while a "lock" file exists, 2.14 leaves one behind
    tag = hashlib.sha1(" ".join([torch.__version__, *flags]).encode()).hexdigest()[:8]
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the ninja wheel's binary, when its environment is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        built = load(f"dinov3_heads_{source}_{tag}", [str(path)], extra_cflags=["-O3", *flags],
                     is_python_module=False)
    except Exception as error:  # noqa: BLE001 - whatever stops the build, the PyTorch way gives the same numbers
        warnings.warn(f"could not build {path} ({type(error).__name__}: {error}); its operation takes its PyTorch "
                      "way on the CPU (slower, same results)", stacklevel=3)
        return None
    return ctypes.CDLL(built)


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="dinov3-heads-kernel")


if hasattr(os, "register_at_fork"):  # a forked child (a data-loader worker) has none of its parent's threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def threads_for(items: int) -> int:
    """How many parts ``run_parts`` makes of ``items`` work items: at most ``torch.get_num_threads()``."""
    return max(1, min(torch.get_num_threads(), items))


def run_parts(call: Callable[[int, int, int], int], items: int, name: str, threads: int | None = None) -> None:
    """Split ``items`` work items into ``threads`` (default ``threads_for(items)``) contiguous ranges and run
    ``call(part, first, last)`` on each, one per thread. A non-zero status is an allocation failure inside the kernel
    ``name``."""
    threads = threads or threads_for(items)
    bounds = [items * i // threads for i in range(threads + 1)]
    if threads == 1:
        codes = [call(0, 0, items)]
    else:
        codes = list(_pool(threads).map(lambda part: call(part, bounds[part], bounds[part + 1]), range(threads)))
    if any(codes):
        raise MemoryError(f"the compiled kernel {name} could not allocate its work buffer")
