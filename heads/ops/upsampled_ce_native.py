"""The compiled rows-by-recurrence kernel of ``upsampled_ce`` (``csrc/upsampled_ce_rows.cpp``; building and loading:
``heads/ops/native.py``): work items of one image and one tile of 16 output columns, spread over threads."""

from __future__ import annotations

import torch

from . import native

TILE = 16  # output columns per work item: TILE in the source
_ARGS = ((native.POINTER,) * 5 + (native.INT,) + (native.POINTER,) * 2 + (native.INT,) * 6 + (native.INT32,)
         + (native.INT,) * 2 + (native.POINTER,) * 3)


def rows_kernel(flags: tuple[str, ...] = ()):
    """The C function (built with extra compiler ``flags``), or ``None`` where compiled kernels are unavailable."""
    return native.kernel("upsampled_ce_rows", "upsampled_ce_rows", _ARGS, flags)


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
    threads = native.threads_for(items)
    # each thread adds into its own gradient, (B, h, w, K): neighbouring tiles read the same input columns
    grads = logits.new_zeros(threads if need_grad else 0, batch, height_in, width_in, classes)
    inputs = [t.data_ptr() for t in (logits, labels, scale, run_index, run_frac)]

    def call(part: int, first: int, last: int) -> int:
        return kernel(*inputs, len(runs), col_index.data_ptr(), col_frac.data_ptr(), classes, height_in, width_in,
                      height, width, restart, int(need_grad), first, last, norms.data_ptr(), picked.data_ptr(),
                      grads[part].data_ptr() if need_grad else 0)

    native.run_parts(call, items, "upsampled_ce_rows", threads)
    return norms, picked, grads.sum(0).permute(0, 3, 1, 2) if need_grad else None
