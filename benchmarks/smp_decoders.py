"""smp decoder heads vs. the linear head on ViT-S/16 features at 512 px: parameters and training cost per image.

The frozen backbone (random ViT-S/16, nothing downloaded; layers 2, 5, 8, 11 with the final norm) runs once; each
head is then timed for forward + loss (cross-entropy on 150-class ADE20K-like labels) + backward on those four
stride-16 maps, and compared with ``LinearSegHead`` on the same maps. Decoders use smp's default widths
(``pyramid_channels`` 256). Prints a table, then one line per decoder ``<name>: <ratio>x`` (time / linear time).

    python benchmarks/smp_decoders.py                       # CPU, 1 timed run per head
    python benchmarks/smp_decoders.py --device cuda --iters 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import build_backbone  # noqa: E402
from benchmarks.common import sync  # noqa: E402
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
    parser.add_argument("--batch", type=int, default=2)  # smp's pooled BatchNorms (UPerNet, DeepLabV3+) need >= 2
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    args = parser.parse_args()
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
        rows.append((name, params, seconds_per_step(head, features, targets, device, args.iters, args.warmup) / args.batch))
        head.cpu()
    base = rows[0][2]
    print(f"ViT-S/16 features at {args.size} px on {device}, {args.num_classes} classes, batch {args.batch}; "
          "head forward + loss + backward per image (best of --iters)")
    print(f"{'head':<14} {'parameters':>12} {'ms / image':>12} {'vs linear':>10}")
    for name, params, seconds in rows:
        print(f"{name:<14} {params / 1e6:>11.2f}M {seconds * 1e3:>12.1f} {seconds / base:>9.1f}x")
    for name, _, seconds in rows[1:]:
        print(f"{name}: {seconds / base:.1f}x")


if __name__ == "__main__":
    main()
