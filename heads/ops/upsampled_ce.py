"""Cross-entropy of bilinearly upsampled logits, without the full-resolution logits in memory.

``upsampled_cross_entropy(logits (B, K, h, w), mask (B, H, W))`` equals
``F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear", align_corners=False), mask, reduction="sum")``
divided by the labelled-pixel count (``avg_non_ignore=True``) or by ``B * H * W`` (``False``), gradient included,
up to float rounding. A linear head's logits live on a 1/16 grid: for 150 classes at 512 px the full-resolution
logits and their gradient are 150 MiB per image each, and the plain path runs over them about ten times (upsample,
log-softmax, pick, and their backwards), mostly from main memory.

Common to every way below: the logits are shifted by their largest class at each location (the softmax does not
change) and scaled by ``log2(e)``, so that ``exp2`` (several times cheaper than ``exp`` on a CPU) gives the
softmax's numerators. Since the loss is the last operation, its gradient (``softmax - onehot`` over the count, zero
on ignored pixels) is formed while the rows are at hand and pulled back to the input rows; ``backward`` only scales
the stored ``(B, K, h, w)`` gradient. Not twice differentiable.

- **Rows by recurrence** (CPU): output row ``r`` reads input rows ``low`` and ``high`` with weight ``f_r`` on
  ``high``, and ``f_r`` grows by the same step across the rows between two input rows, so their numerators form a
  geometric sequence: ``exp2(z_low + f_r d) = exp2(z_low + f_0 d) * exp2(step * d) ** k``. Each row costs one
  multiply per logit (a fresh ``exp2`` every ``RESTART`` rows bounds the rounding), one sum over classes and two
  multiply-adds into the two input rows' gradients: no row blend, and no per-pixel ``exp2``. Every class at least
  ``FLOOR`` octaves above the peak keeps every numerator a normal float, so no numerator vanishes in the recurrence;
  otherwise the chunks run. Two implementations of the same arithmetic:

  - compiled (``upsampled_ce_native``, built on first use where a C++ compiler is found): tiles of 16 output
    columns, each upsampled along the width from the input columns it reads and kept in registers and L1 through
    the rows; one pass per output row; the gradient pulled back to the input columns per tile. About 3.5x faster
    than the PyTorch one.
  - PyTorch (no compiler, or ``DINOV3_HEADS_CPU_KERNELS=0``): the logits upsampled along the width once,
    ``(h, B, K, W)`` ("wide"), then three passes over each row's ``(B, K, W)`` slice; the label logits enter only
    through their sum, the dot product of the wide logits with the one-hot part of the gradient (one scatter).
- **Chunks** (accelerators, or logits whose classes span more than ``FLOOR`` octaves): the wide logits as above;
  each chunk of output rows is the blend of the few wide rows it reads (``A_h[rows] @ ...``), its own peak
  subtracted, ``exp2``, summed; a few large kernels per chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import upsampled_ce_native

CHUNK_ELEMENTS = 1 << 20  # floats of logits per chunk on a CPU (4 MiB, cache-sized): rows = this / (B * K * W)
DEVICE_CHUNK_ELEMENTS = 1 << 26  # on an accelerator (256 MiB): fewer, larger kernels
ROW_ELEMENTS = 1 << 18  # floats per (images, K, W) slice of the recurrence (1 MiB): images taken together
RESTART = 8  # the recurrence takes a fresh exp2 every this many rows (at most 7 products in a row)
FLOOR = -120.0  # log2 units below the peak: 2 ** FLOOR is a normal float32 (the smallest is 2 ** -126)
LN2 = math.log(2.0)


def bilinear_weights(size_in: int, size_out: int, device=None) -> torch.Tensor:
    """The ``(size_out, size_in)`` matrix of 1-D bilinear resizing with ``align_corners=False`` (PyTorch's rule:
    source ``(i + 0.5) * size_in / size_out - 0.5``, clamped at 0; the upper neighbour clamped to the last)."""
    low, high, frac = _taps(size_in, size_out)
    frac = frac.float()
    weights = torch.zeros(size_out, size_in)
    rows = torch.arange(size_out)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.to(device)


def _taps(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each output index's two source indices ``low``, ``high`` and the weight on ``high`` (float64)."""
    scale = size_in / size_out
    src = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    return low, high, src - low


def row_runs(size_in: int, size_out: int) -> list[tuple[int, int, int, int, float, float]]:
    """Output rows in runs ``(start, stop, low, high, frac, step)``: rows ``start..stop-1`` read input rows
    ``low`` and ``high`` with weights ``1 - f`` and ``f``, ``f = frac + (row - start) * step``."""
    low, high, frac = (t.tolist() for t in _taps(size_in, size_out))
    runs, start = [], 0
    while start < size_out:
        pair = (low[start], high[start])
        step = frac[start + 1] - frac[start] if start + 1 < size_out and (low[start + 1], high[start + 1]) == pair \
            else 0.0
        stop = start + 1
        while (stop < size_out and (low[stop], high[stop]) == pair
               and abs(frac[stop] - frac[start] - (stop - start) * step) < 1e-9):
            stop += 1
        runs.append((start, stop, *pair, frac[start], step))
        start = stop
    return runs


def _by_chunks(wide, labels, scale, need_grad, rows):
    """Chunks of output rows: each blended from its wide rows, its own peak subtracted, ``exp2``, summed."""
    height_in, batch, classes, width = wide.shape
    height = labels.shape[0]
    rows_h = bilinear_weights(height_in, height)  # on the host: the chunks' input rows are read without syncs
    weights_h = rows_h.to(wide.device)
    grad_wide = torch.zeros_like(wide) if need_grad else None
    total = wide.new_zeros((), dtype=torch.float64)
    chunk = CHUNK_ELEMENTS if wide.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    step = rows or max(1, chunk // max(1, batch * classes * width))
    nonzero = rows_h.ne(0)
    for top in range(0, height, step):
        bottom = min(height, top + step)
        used = nonzero[top:bottom].any(0).nonzero()[:, 0]
        first, last = int(used[0]), int(used[-1]) + 1
        blend = weights_h[top:bottom, first:last]  # (R, n)
        z = (blend @ wide[first:last].reshape(last - first, -1)).view(bottom - top, batch, classes, width)
        label, weight = labels[top:bottom, :, None], scale[top:bottom]  # (R, B, 1, W), (R, B, W)
        z.sub_(z.amax(2, keepdim=True))
        picked = z.gather(2, label)[:, :, 0]
        z.exp2_()
        norm = z.sum(2, keepdim=True)
        total += ((norm[:, :, 0].log2() - picked) * weight).sum(dtype=torch.float64)
        if need_grad:
            z.mul_(weight[:, :, None] / norm)
            z.scatter_add_(2, label, -weight[:, :, None])
            grad_wide[first:last] += (blend.t() @ z.view(bottom - top, -1)).view(last - first, batch, classes,
                                                                                   width)
    return total * LN2, grad_wide


def _by_recurrence(wide, labels, scale, need_grad):
    """Output rows one at a time, numerators by the geometric recurrence along each run (module docstring), in
    PyTorch: three passes over each row's ``(images, K, W)`` slice. Where the compiled kernel builds,
    ``_by_compiled_rows`` runs instead."""
    height_in, batch, classes, width = wide.shape
    height = labels.shape[0]
    low, high, frac = (t.to(wide.device) for t in _taps(height_in, height))
    weights = scale[:, None] * torch.stack([1 - frac, frac], 1).float()[:, :, None, None]  # (H, 2, B, W)
    # the one-hot part of the gradient, -weight at each pixel's label in its two wide rows; the gradient grows on it
    grad_wide = torch.zeros_like(wide)
    place = (labels * width).add_(torch.arange(batch, device=wide.device)[:, None] * classes * width
                                  + torch.arange(width, device=wide.device))  # (H, B, W): offset in a wide row
    rows = torch.stack([low, high], 1)[:, :, None, None] * (batch * classes * width)  # (H, 2, 1, 1)
    grad_wide.view(-1).scatter_add_(0, (rows + place[:, None]).view(-1), weights.view(-1).neg())
    # minus the weighted sum of the label logits; a dot product per wide row, summed in float64
    label_terms = sum(torch.dot(wide[i].view(-1), grad_wide[i].view(-1)).double() for i in range(height_in))
    norms = wide.new_empty(height, batch, width)
    group = max(1, ROW_ELEMENTS // (classes * width))
    runs = row_runs(height_in, height)
    for b0 in range(0, batch, group):
        b1 = min(batch, b0 + group)
        numer = wide.new_empty(b1 - b0, classes, width)
        coef = wide.new_empty(2, b1 - b0, 1, width)
        for start, stop, lo, hi, f0, step in runs:
            z_low = wide[lo, b0:b1]
            d = wide[hi, b0:b1] - z_low
            grads = grad_wide[lo:hi + 1, b0:b1]  # the two wide rows' gradients (one when the border clamps)
            if step == 0 or lo == hi:  # every row of the run has the same numerators
                torch.add(z_low, d, alpha=f0, out=numer).exp2_()
                norm = numer.sum(1)  # (G, W)
                norms[start:stop, b0:b1] = norm
                if need_grad:
                    shares = weights[start:stop, :, b0:b1].sum(0) / norm  # (2, G, W)
                    grads.addcmul_(numer, (shares if lo < hi else shares.sum(0, keepdim=True))[:, :, None])
                continue
            ratio = (d * step).exp2_()
            for row in range(start, stop):
                k = row - start
                if k % RESTART:
                    numer.mul_(ratio)
                else:
                    torch.add(z_low, d, alpha=f0 + k * step, out=numer).exp2_()
                norm = torch.sum(numer, 1, keepdim=True, out=norms[row, b0:b1, None])  # (G, 1, W)
                if need_grad:
                    grads.addcmul_(numer, torch.div(weights[row, :, b0:b1, None], norm, out=coef))
    total = (scale * norms.log2()).sum(dtype=torch.float64) + label_terms
    return total * LN2, grad_wide if need_grad else None


def _by_compiled_rows(kernel, x, labels, scale, need_grad):
    """Rows by recurrence in the compiled kernel, which upsamples along the width itself (``upsampled_ce_native``)."""
    (height, width), (height_in, width_in) = labels.shape[-2:], x.shape[-2:]
    norms, picked, grad = upsampled_ce_native.rows(kernel, x, labels, scale, row_runs(height_in, height),
                                                   _taps(width_in, width), RESTART, need_grad)
    return (scale * (norms.log2_() - picked)).sum(dtype=torch.float64) * LN2, grad


def _by_wide_rows(x, labels, scale, need_grad, recurrence, rows):
    """The PyTorch ways: upsample along the width once, then rows by recurrence or chunks of rows."""
    weights_w = bilinear_weights(x.shape[-1], labels.shape[-1], x.device)
    wide = (x.permute(2, 0, 1, 3) @ weights_w.t()).contiguous()  # (h, B, K, W): input rows are matrices
    # (H, B, W): an output row's pixels of every image together
    labels, scale = labels.transpose(0, 1).contiguous(), scale.transpose(0, 1).contiguous()
    total, grad_wide = (_by_recurrence(wide, labels, scale, need_grad) if recurrence
                        else _by_chunks(wide, labels, scale, need_grad, rows))
    return total, (grad_wide @ weights_w).permute(1, 2, 0, 3) if need_grad else None


class _UpsampledCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, mask, ignore_index, avg_non_ignore, rows):
        x = logits.float()
        x = (x - x.amax(1, keepdim=True)) * (1 / LN2)  # octaves below each location's peak class: <= 0
        valid = mask != ignore_index
        count = valid.sum() if avg_non_ignore else torch.tensor(mask.numel(), device=mask.device)
        scale = valid.float().div_(count.clamp(min=1))  # each pixel's share of the loss: 1 / count or 0
        labels = mask.masked_fill(~valid, 0).long()
        need_grad = ctx.needs_input_grad[0]
        recurrence = x.device.type == "cpu" and rows is None and bool(x.amin() >= FLOOR)
        kernel = upsampled_ce_native.rows_kernel() if recurrence else None
        if kernel is not None:
            total, grad = _by_compiled_rows(kernel, x, labels, scale, need_grad)
        else:
            total, grad = _by_wide_rows(x, labels, scale, need_grad, recurrence, rows)
        if grad is not None:
            ctx.save_for_backward(grad.to(logits.dtype))
        return total.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def upsampled_cross_entropy(logits: torch.Tensor, mask: torch.Tensor, ignore_index: int = 255,
                            avg_non_ignore: bool = True, rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits (B, K, h, w)`` upsampled (bilinear, ``align_corners=False``) to the size of
    ``mask (B, H, W)``, over labelled pixels (``avg_non_ignore``) or over all ``B * H * W`` pixels (Meta's).

    Labels must be ``0..K-1`` or ``ignore_index``. ``rows``: take the chunked way with this many output rows per
    chunk (default: rows by recurrence on a CPU when the logits allow, else chunks of about 4 MiB of logits on a
    CPU, 256 MiB on an accelerator). A batch without labelled pixels gives 0 (gradient 0).
    """
    if logits.dim() != 4 or mask.dim() != 3 or logits.shape[0] != mask.shape[0]:
        raise ValueError(f"expected logits (B, K, h, w) and mask (B, H, W), got {tuple(logits.shape)} and "
                         f"{tuple(mask.shape)}")
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= logits.shape[1]))
    if bad.any():
        raise ValueError(f"mask labels must be 0..{logits.shape[1] - 1} or {ignore_index}, found "
                         f"{int(mask[bad][0])}")
    return _UpsampledCE.apply(logits, mask, ignore_index, avg_non_ignore, rows)


def sampled_cross_entropy(logits: torch.Tensor, mask: torch.Tensor, points: int, ignore_index: int = 255,
                          avg_non_ignore: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """An unbiased estimate of ``upsampled_cross_entropy`` from ``points`` labelled pixels per image.

    Each image draws ``points`` of its labelled pixels uniformly (with replacement, from the global random
    generator unless ``generator`` is given); their logits are the upsampled logits at those pixels exactly
    (``grid_sample`` at the pixel centres, border-clamped as ``F.interpolate`` clamps). Image ``i`` with ``n_i``
    labelled pixels contributes ``n_i`` times the mean loss of its samples; the sum is divided by the labelled
    pixels (``avg_non_ignore``) or all pixels, as in the exact loss. The expectation equals the exact loss, the
    gradient's too; the cost is ``B * K * points`` instead of ``B * K * H * W``.
    """
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    batch, (height, width) = mask.shape[0], mask.shape[-2:]
    valid = (mask != ignore_index).reshape(batch, -1)
    counts = valid.sum(1)
    picks = []
    for b in range(batch):
        labelled = valid[b].nonzero()[:, 0]
        draw = torch.randint(max(1, len(labelled)), (points,), device=mask.device, generator=generator)
        picks.append(labelled[draw] if len(labelled) else draw)
    flat = torch.stack(picks)  # (B, P) pixel indices
    labels = mask.reshape(batch, -1).gather(1, flat).long()
    bad = (counts[:, None] > 0) & ((labels < 0) | (labels >= logits.shape[1]))
    if bad.any():
        raise ValueError(f"mask labels must be 0..{logits.shape[1] - 1} or {ignore_index}, found {int(labels[bad][0])}")
    rows, cols = (flat // width).float(), (flat % width).float()  # float32: bf16 rounds pixel indices above 256
    grid = torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], dim=-1)[:, None]  # (B, 1, P, 2)
    values = F.grid_sample(logits.float(), grid, mode="bilinear", padding_mode="border",
                           align_corners=False)[:, :, 0]  # (B, K, P)
    per_point = F.cross_entropy(values, labels.where(counts[:, None] > 0, 0), reduction="none")  # (B, P)
    total = (per_point.mean(1) * counts).sum()
    return total / (counts.sum().clamp(min=1) if avg_non_ignore else mask.numel())
