"""Mask2Former with Meta's ViT-Adapter neck vs. with the simple feature pyramid: parameters and training cost.

Both heads get the same inputs: four random ViT maps ``(B, D, H/16, W/16)`` (what a frozen backbone gives;
the backbone itself is not timed) plus the normalized images, and ADE20K-like targets. Timed: head forward +
loss + backward. The pyramid head uses the ``projected`` pixel-decoder layout (``head=m2f``), the adapter head
Meta's layout (``head=m2f_adapter``); everything else is equal.

    python benchmarks/adapter.py                       # CPU, ViT-S width, 256 px, batch 1, hidden 256
    python benchmarks/adapter.py --device cuda         # GPU: 512 px, batch 8, 10 timed steps after 3
    python benchmarks/adapter.py --device cuda --amp   # bf16 autocast
    python benchmarks/adapter.py --embed-dim 1024 --hidden-dim 256   # ViT-L width
    python benchmarks/adapter.py --quick               # CPU smoke run: 128 px, 1024 loss points

On CUDA each head's peak memory (``torch.cuda.max_memory_allocated`` over its steps) is printed too.
The last line is ``adapter vs pyramid fwd+bwd: <ratio>x``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones.features import Features  # noqa: E402
from benchmarks.common import (ade_like_masks, describe, device_defaults, peak_memory_mib,  # noqa: E402
                               reset_peak_memory, timed)
from heads.mask2former import Mask2FormerHead  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image side, multiple of 32 (256 on CPU, 512 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="1 on CPU, 8 on CUDA")
    parser.add_argument("--embed-dim", type=int, default=384, help="ViT width (384 ViT-S, 1024 ViT-L, 4096 ViT-7B)")
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--num-points", type=int, default=12544, help="points per mask in the losses")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (1 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (1 on CPU, 3 on CUDA)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 128 px, batch 1, 1024 loss points")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.num_points = args.size or 128, args.batch or 1, 1024
    device_defaults(args, cpu=dict(size=256, batch=1, iters=1, warmup=1),
                    cuda=dict(size=512, batch=8, iters=10, warmup=3))
    device = torch.device(args.device)
    print(f"{describe(device)}, batch {args.batch}, {args.size} px, ViT width {args.embed_dim}, "
          f"hidden {args.hidden_dim}, {args.iters} timed steps after {args.warmup}, amp {args.amp}")
    torch.manual_seed(0)

    side = args.size // 16
    maps = [torch.randn(args.batch, args.embed_dim, side, side, device=device) for _ in range(4)]
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    features = Features(maps=maps, cls=None, strides=[16] * 4, channels=[args.embed_dim] * 4, patch_size=16,
                        padded_size=(args.size, args.size), images=images)
    targets = {"mask": ade_like_masks(args.batch, args.size, args.num_classes, device)}
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()
    common = dict(in_channels=[args.embed_dim] * 4, strides=[16] * 4, num_classes=args.num_classes,
                  hidden_dim=args.hidden_dim, num_heads=16 if args.hidden_dim % 16 == 0 else 8,
                  num_points=args.num_points)
    heads = {
        "pyramid": Mask2FormerHead(**common, neck="pyramid", pixel_decoder_layout="projected"),
        "adapter": Mask2FormerHead(**common, neck="adapter", pixel_decoder_layout="meta"),
    }
    seconds = {}
    for name, head in heads.items():
        head = head.to(device).train()

        def step(head=head):
            with amp:
                outputs = head(features, features.padded_size)
                loss = sum(head.loss(outputs, targets).values())
            loss.backward()
            head.zero_grad(set_to_none=True)

        reset_peak_memory(device)
        seconds[name] = timed(step, device, args.iters, args.warmup)
        peak = peak_memory_mib(device)
        params = sum(p.numel() for p in head.parameters())
        neck = head.adapter if name == "adapter" else head.pyramid
        print(f"{name:8s} params {params / 1e6:7.2f}M (neck {sum(p.numel() for p in neck.parameters()) / 1e6:.2f}M)  "
              f"fwd+bwd {seconds[name]:.3f} s / batch of {args.batch} at {args.size}px on {device.type}"
              + ("" if peak is None else f", peak CUDA memory {peak:.0f} MiB"))
        head.cpu()  # free the GPU for the next head
    ratio_params = sum(p.numel() for p in heads["adapter"].parameters()) / sum(p.numel() for p in heads["pyramid"].parameters())
    print(f"adapter vs pyramid params: {ratio_params:.2f}x")
    print(f"adapter vs pyramid fwd+bwd: {seconds['adapter'] / seconds['pyramid']:.2f}x")


if __name__ == "__main__":
    main()
