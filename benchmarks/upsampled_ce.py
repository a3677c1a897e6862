"""The fused upsample + cross-entropy against the plain ``F.interpolate`` + ``F.cross_entropy``: forward + backward.

    python benchmarks/upsampled_ce.py [--device cuda] [--batch N] [--size 512] [--classes 150]
    python benchmarks/upsampled_ce.py --quick     # CPU smoke run: 128 px

Linear-segmentation logits ``(B, K, size / 16, size / 16)`` (random, 3 x randn) against ADE20K-like label maps
``(B, size, size)``; each way's loss and gradient with respect to the logits, timed (mean of ``--iters`` after
``--warmup``, synchronised on CUDA). Ways: ``plain`` (the full-resolution logits in memory), ``fused``
(``heads.ops.upsampled_ce.upsampled_cross_entropy`` as ``SegLoss`` calls it: rows by recurrence in the compiled
kernel on a CPU, chunks on an accelerator) and, on a CPU, ``torch rows`` (the same recurrence in PyTorch, as where no
compiler is found) and ``chunks`` (the fused loss forced to take the chunked way, the accelerators' one).
The ways' largest loss and gradient differences from ``plain`` are printed, and on CUDA each way's peak memory
(``torch.cuda.max_memory_allocated``). Defaults: batch 2, 3 timed runs after 1 on a CPU; batch 8, 10 after 3 on
CUDA. The last line is ``upsampled ce fwd+bwd plain vs fused: <ratio>x`` (above 1: the fused loss is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (ade_like_masks, describe, device_defaults, peak_memory_mib,  # noqa: E402
                               reset_peak_memory, timed)
from heads.ops.upsampled_ce import CHUNK_ELEMENTS, upsampled_cross_entropy  # noqa: E402
from heads.ops.native import switched_off  # noqa: E402


def plain_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss the fused one reproduces: upsample, then cross-entropy over labelled pixels."""
    up = F.interpolate(logits, mask.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, mask, ignore_index=255)


def torch_rows_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The fused loss with its compiled kernel switched off: rows by recurrence in PyTorch."""
    with switched_off():
        return upsampled_cross_entropy(logits, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="2 on CPU, 8 on CUDA")
    parser.add_argument("--size", type=int, default=512, help="label map side (logits: size / 16)")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--iters", type=int, default=None, help="timed runs (3 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (1 on CPU, 3 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="128 px, one timed run")
    args = parser.parse_args()
    if args.quick:
        args.size, args.iters = 128, 1
    device_defaults(args, cpu=dict(batch=2, iters=3, warmup=1), cuda=dict(batch=8, iters=10, warmup=3))
    device = torch.device(args.device)
    torch.manual_seed(0)
    logits = (3 * torch.randn(args.batch, args.classes, args.size // 16, args.size // 16, device=device))
    mask = ade_like_masks(args.batch, args.size, args.classes, device)
    print(f"{describe(device)}, batch {args.batch}, {args.classes} classes, logits {args.size // 16}^2 -> "
          f"{args.size}^2, mean of {args.iters} after {args.warmup}")
    rows = max(1, CHUNK_ELEMENTS // (args.batch * args.classes * args.size))
    ways = {"plain": plain_loss, "fused": upsampled_cross_entropy}
    if device.type == "cpu":
        ways["torch rows"] = torch_rows_loss
        ways["chunks"] = lambda x, m: upsampled_cross_entropy(x, m, rows=rows)

    def run(loss_fn):
        x = logits.clone().requires_grad_()
        loss = loss_fn(x, mask)
        loss.backward()
        return loss.detach(), x.grad

    expected_loss, expected_grad = run(plain_loss)
    seconds = {}
    for name, loss_fn in ways.items():
        loss, grad = run(loss_fn)
        reset_peak_memory(device)
        seconds[name] = timed(lambda: run(loss_fn), device, args.iters, args.warmup)
        memory = peak_memory_mib(device)
        print(f"{name}: {seconds[name] * 1000:.1f} ms | loss diff {float((loss - expected_loss).abs()):.1e} | "
              f"grad diff {float((grad - expected_grad).abs().max()):.1e} (grad max "
              f"{float(expected_grad.abs().max()):.1e})" + (f" | peak {memory:.0f} MiB" if memory is not None else ""))
    if "chunks" in seconds:
        print(f"upsampled ce fwd+bwd chunks vs torch rows: {seconds['chunks'] / seconds['torch rows']:.2f}x")
        print(f"upsampled ce fwd+bwd torch rows vs compiled rows: {seconds['torch rows'] / seconds['fused']:.2f}x")
    print(f"upsampled ce fwd+bwd plain vs fused: {seconds['plain'] / seconds['fused']:.2f}x")


if __name__ == "__main__":
    main()
