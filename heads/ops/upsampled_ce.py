"""Cross-entropy of bilinearly upsampled logits, without the full-resolution logits in memory.

``upsampled_cross_entropy(logits (B, K, h, w), mask (B, H, W))`` equals
``F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear", align_corners=False), mask, reduction="sum")``
divided by the labelled-pixel count (``avg_non_ignore=True``) or by ``B * H * W`` (``False``), gradient included,
up to float rounding. A linear head's logits live on a 1/16 grid: for 150 classes at 512 px the full-resolution
logits and their gradient are 150 MiB per image each, and the plain path runs over them about ten times (upsample,
log-softmax, pick, and their backwards), mostly from main memory.

Here the upsampling is split in two: along the width, ``logits @ A_w^T`` (``A_w``: the ``(W, w)`` bilinear
weights) gives ``(B, K, h, W)`` once; then each chunk of ``rows`` output rows is the blend of the few input rows
it reads (``A_h[rows] @ ...``, the weights scaled by ``log2(e)`` so that the softmax takes ``exp2``, several times
cheaper than ``exp`` on a CPU), its log-sum-exp over classes and label logit are taken, and since the loss is
the last operation, its gradient (``softmax - onehot`` over the count, zero on ignored pixels) is formed
right there and pulled back through the chunk's row blend. One pass over each chunk while it sits in cache, and
``backward`` only scales the stored ``(B, K, h, w)`` gradient. Not twice differentiable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 20  # floats of logits per chunk on a CPU (4 MiB, cache-sized): rows = this / (B * K * W)
DEVICE_CHUNK_ELEMENTS = 1 << 26  # on an accelerator (256 MiB): fewer, larger kernels
LN2 = math.log(2.0)


def bilinear_weights(size_in: int, size_out: int, device=None) -> torch.Tensor:
    """The ``(size_out, size_in)`` matrix of 1-D bilinear resizing with ``align_corners=False`` (PyTorch's rule:
    source ``(i + 0.5) * size_in / size_out - 0.5``, clamped at 0; the upper neighbour clamped to the last)."""
    scale = size_in / size_out
    src = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = (src - low).float()
    weights = torch.zeros(size_out, size_in)
    rows = torch.arange(size_out)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.to(device)


class _UpsampledCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, mask, ignore_index, avg_non_ignore, rows):
        batch, classes, height_in, _ = logits.shape
        height, width = mask.shape[-2:]
        x = logits.float()
        weights_w = bilinear_weights(x.shape[-1], width, x.device)
        rows_h = bilinear_weights(height_in, height)  # on the host: the chunks' input rows are read without syncs
        weights_h = rows_h.to(x.device)
        blend_log2e = (rows_h.double() / LN2).float().to(x.device)
        wide = (x.permute(2, 0, 1, 3) @ weights_w.t()).contiguous()  # (h, B, K, W): input rows are matrices
        valid = mask != ignore_index
        count = valid.sum() if avg_non_ignore else torch.tensor(mask.numel(), device=mask.device)
        labels = torch.where(valid, mask, 0).long().transpose(0, 1)[:, :, None]  # (H, B, 1, W)
        keeps = valid.transpose(0, 1)  # (H, B, W)
        need_grad = ctx.needs_input_grad[0]
        grad_wide = torch.zeros_like(wide) if need_grad else None
        inv_count = 1.0 / count.clamp(min=1).double()
        total = x.new_zeros((), dtype=torch.float64)
        chunk = CHUNK_ELEMENTS if x.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
        step = rows or max(1, chunk // max(1, batch * classes * width))
        nonzero_cols = rows_h.ne(0)
        for top in range(0, height, step):
            bottom = min(height, top + step)
            used = nonzero_cols[top:bottom].any(0).nonzero()[:, 0]
            first, last = int(used[0]), int(used[-1]) + 1
            blend = weights_h[top:bottom, first:last]  # (R, n)
            z = (blend_log2e[top:bottom, first:last] @ wide[first:last].reshape(last - first, -1)).view(
                bottom - top, batch, classes, width)  # logits * log2(e): exp2 is several times cheaper than exp
            label, keep = labels[top:bottom], keeps[top:bottom]  # (R, B, 1, W), (R, B, W)
            peak = z.amax(2, keepdim=True)
            z.sub_(peak)
            picked = z.gather(2, label)[:, :, 0]
            z.exp2_()
            norm = z.sum(2, keepdim=True)
            nll = norm[:, :, 0].log() - picked * LN2  # log-sum-exp - label logit (both shifted by the peak)
            total += nll.masked_fill_(~keep, 0).sum(dtype=torch.float64)
            if need_grad:
                z.div_(norm)
                z.scatter_add_(2, label, torch.full_like(label, -1, dtype=z.dtype))
                z.mul_((keep[:, :, None] * inv_count).to(z.dtype))
                grad_wide[first:last] += (blend.t() @ z.view(bottom - top, -1)).view(last - first, batch, classes,
                                                                                       width)
        loss = (total * inv_count).to(x.dtype)
        if need_grad:
            ctx.save_for_backward((grad_wide @ weights_w).permute(1, 2, 0, 3).to(logits.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def upsampled_cross_entropy(logits: torch.Tensor, mask: torch.Tensor, ignore_index: int = 255,
                            avg_non_ignore: bool = True, rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits (B, K, h, w)`` upsampled (bilinear, ``align_corners=False``) to the size of
    ``mask (B, H, W)``, over labelled pixels (``avg_non_ignore``) or over all ``B * H * W`` pixels (Meta's).

    Labels must be ``0..K-1`` or ``ignore_index``. ``rows``: output rows per chunk (default: about 4 MiB of logits
    on a CPU, 256 MiB on an accelerator).
    A batch without labelled pixels gives 0 (gradient 0).
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
    rows, cols = (flat // width).to(logits.dtype), (flat % width).to(logits.dtype)
    grid = torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], dim=-1)[:, None]  # (B, 1, P, 2)
    values = F.grid_sample(logits.float(), grid.float(), mode="bilinear", padding_mode="border",
                           align_corners=False)[:, :, 0]  # (B, K, P)
    per_point = F.cross_entropy(values, labels.where(counts[:, None] > 0, 0), reduction="none")  # (B, P)
    total = (per_point.mean(1) * counts).sum()
    return total / (counts.sum().clamp(min=1) if avg_non_ignore else mask.numel())
