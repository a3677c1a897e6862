"""smp decoder heads vs. the linear head on ViT-S/16 features at 512 px: parameters and training cost per image.

The frozen backbone (random ViT-S/16, nothing downloaded; layers 2, 5, 8, 11 with the final norm) runs once; each
head is then timed for forward + loss (cross-entropy on 150-class ADE20K-like labels) + backward on those four
stride-16 maps, and compared with ``LinearSegHead`` on the same maps. Decoders use smp's default widths
(``pyramid_channels`` 256). Prints a table, then one line per decoder ``<name>: <ratio>x`` (time / linear time).

    python benchmarks/smp_decoders.py                       # CPU: batch 2, 1 timed run per head after 1
    python benchmarks/smp_decoders.py --device cuda         # GPU: batch 8, best of 10 after 3
    python benchmarks/smp_decoders.py --quick               # CPU smoke run: 256 px

On CUDA each head's peak memory (``torch.cuda.max_memory_allocated`` over its steps) is in the table too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import build_backbone  # noqa: E402
from benchmarks.common import describe, device_defaults, peak_memory_mib, reset_peak_memory, sync  # noqa: E402
from heads import LinearSegHead  # noqa: E402
from heads.smp import DECODERS, SMPHead  # noqa: E402


def seconds_per_step(head, features, targets, device: torch.device, iters: int, warmup: int) -> float:
    """Best seconds of one forward + loss + backward over ``iters`` runs after ``warmup`` runs."""
    def step():
        outputs = head(features, features.padded_size)
        sum(head.loss(outputs, targets).values()).backward()
        head.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    # smp's pooled BatchNorms (UPerNet, DeepLabV3+) need a batch >= 2
    parser.add_argument("--batch", type=int, default=None, help="2 on CPU, 8 on CUDA")
    parser.add_argument("--iters", type=int, default=None, help="timed steps, best kept (1 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (1 on CPU, 3 on CUDA)")
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 256 px")
    args = parser.parse_args()
    if args.quick:
        args.size = 256
    device_defaults(args, cpu=dict(batch=2, iters=1, warmup=1), cuda=dict(batch=8, iters=10, warmup=3))
    device = torch.device(args.device)
    torch.manual_seed(0)

    backbone = build_backbone("vits16", weights=None).to(device).eval()
    with torch.no_grad():
        features = backbone(torch.randn(args.batch, 3, args.size, args.size, device=device))
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, args.num_classes, (args.batch, 1, 16, 16), generator=g).float()
    mask = torch.nn.functional.interpolate(coarse, size=(args.size, args.size), mode="nearest")[:, 0].long()
    mask[:, : args.size // 32] = 255
    targets = {"mask": mask.to(device)}
    channels, strides = list(backbone.channels), list(backbone.strides)

    heads = {"linear": LinearSegHead(channels, strides, args.num_classes)}
    heads.update({name: SMPHead(channels, strides, args.num_classes, name) for name in args.decoders})
    rows = []
    for name, head in heads.items():
        head = head.to(device).train()
        params = sum(p.numel() for p in head.parameters())
        reset_peak_memory(device)
        seconds = seconds_per_step(head, features, targets, device, args.iters, args.warmup) / args.batch
        rows.append((name, params, seconds, peak_memory_mib(device)))
        head.cpu()
    base = rows[0][2]
    print(f"ViT-S/16 features at {args.size} px on {describe(device)}, {args.num_classes} classes, batch {args.batch}; "
          f"head forward + loss + backward per image (best of {args.iters} after {args.warmup})")
    print(f"{'head':<14} {'parameters':>12} {'ms / image':>12} {'vs linear':>10}"
          + ("" if device.type != "cuda" else f" {'peak MiB':>9}"))
    for name, params, seconds, peak in rows:
        print(f"{name:<14} {params / 1e6:>11.2f}M {seconds * 1e3:>12.1f} {seconds / base:>9.1f}x"
              + ("" if peak is None else f" {peak:>9.0f}"))
    for name, _, seconds, _ in rows[1:]:
        print(f"{name}: {seconds / base:.1f}x")


if __name__ == "__main__":
    main()
