"""The compiled rows-by-recurrence kernel of ``upsampled_ce`` (``csrc/upsampled_ce_rows.cpp``), for CPUs.

Built on first use with ``torch.utils.cpp_extension`` (a plain C++ file without torch headers: about a second, cached
under ``TORCH_EXTENSIONS_DIR``, rebuilt when the source changes; on x86-64 one build holds AVX-512, AVX2 and baseline
versions, chosen when it loads). Called through ``ctypes``, which releases the GIL, on one range of work items (an
image and a tile of 16 output columns each) per thread of ``torch.get_num_threads()``. ``rows_kernel()`` is ``None``,
with a warning, where it cannot be built (no C++ compiler), and without one where the environment sets
``DINOV3_HEADS_CPU_KERNEL=0``: the caller then takes its PyTorch way.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "upsampled_ce_rows.cpp"
NAME = "dinov3_heads_upsampled_ce_rows"
TILE = 16  # output columns per work item: TILE in the source
_POINTER, _INT = ctypes.c_void_p, ctypes.c_int64
_ARGS = [_POINTER] * 5 + [_INT] + [_POINTER] * 2 + [_INT] * 6 + [ctypes.c_int32] + [_INT] * 2 + [_POINTER] * 3


SWITCH = "DINOV3_HEADS_CPU_KERNEL"  # "0": never build or use the kernel


def rows_kernel(flags: tuple[str, ...] = ()):
    """The C function built with extra compiler ``flags`` (none: every version), or ``None`` where it cannot be
    built or ``SWITCH`` is "0"."""
    return None if os.environ.get(SWITCH, "1") == "0" else _build(flags)


@lru_cache(maxsize=None)
def _build(flags: tuple[str, ...]):
    # one build folder per torch version too: torch 2.11 waits while a "lock" file exists, 2.14 leaves one behind
    name = f"{NAME}_{hashlib.sha1(' '.join([torch.__version__, *flags]).encode()).hexdigest()[:8]}"
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the ninja wheel's binary, when its environment is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        path = load(name, [str(SOURCE)], extra_cflags=["-O3", *flags], is_python_module=False)
    except Exception as error:  # noqa: BLE001 - whatever stops the build, the PyTorch way gives the same numbers
        warnings.warn(f"could not build {SOURCE} ({type(error).__name__}: {error}); the upsampled cross-entropy "
                      "takes its PyTorch way on the CPU (about 3.5x slower, same results)", stacklevel=2)
        return None
    function = ctypes.CDLL(path).upsampled_ce_rows
    function.restype, function.argtypes = ctypes.c_int, _ARGS
    return function


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="upsampled-ce")


def rows(kernel, logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, runs: list,
         columns: tuple[torch.Tensor, torch.Tensor, torch.Tensor], restart: int, need_grad: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run ``kernel`` over ``logits (B, K, h, w)`` (octaves below each location's peak), ``labels`` and
    ``scale (B, H, W)``, along the row ``runs`` (``row_runs``) and the column taps ``columns`` (``low``, ``high``,
    ``frac``, ``(W,)`` each).

    Returns ``norms`` and ``picked`` ``(B, H, W)`` (the sum of the numerators, and the logit at the label, in octaves)
    and the gradient (in octaves) wrt ``logits``, ``(B, K, h, w)`` (``None`` without ``need_grad``).
    """
    batch, classes, height_in, width_in = logits.shape
    height, width = labels.shape[-2:]
    logits, labels, scale = logits.float().contiguous(), labels.long().contiguous(), scale.float().contiguous()
    norms, picked = logits.new_empty(labels.shape), logits.new_empty(labels.shape)
    run_index = torch.tensor([run[:4] for run in runs], dtype=torch.int64)
    run_frac = torch.tensor([run[4:] for run in runs], dtype=torch.float64)
    low, high, frac = columns
    col_index, col_frac = torch.stack([low, high], 1).long().contiguous(), frac.float().contiguous()
    items = batch * -(-width // TILE)
    threads = max(1, min(torch.get_num_threads(), items))
    bounds = [items * i // threads for i in range(threads + 1)]
    # each thread adds into its own gradient, (B, h, w, K): neighbouring tiles read the same input columns
    grads = logits.new_zeros(threads if need_grad else 0, batch, height_in, width_in, classes)
    inputs = [t.data_ptr() for t in (logits, labels, scale, run_index, run_frac)]

    def call(part: int) -> int:
        return kernel(*inputs, len(runs), col_index.data_ptr(), col_frac.data_ptr(), classes, height_in, width_in,
                      height, width, restart, int(need_grad), bounds[part], bounds[part + 1], norms.data_ptr(),
                      picked.data_ptr(), grads[part].data_ptr() if need_grad else 0)

    codes = [call(0)] if threads == 1 else list(_pool(threads).map(call, range(threads)))
    if any(codes):
        raise MemoryError(f"{SOURCE.name} could not allocate its work buffer ({classes} classes, {height_in} rows)")
    return norms, picked, grads.sum(0).permute(0, 3, 1, 2) if need_grad else None
