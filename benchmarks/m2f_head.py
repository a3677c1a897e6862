"""Mask2Former head cost vs. frozen DINOv3 backbone cost, per image.

For each backbone (random init, nothing downloaded) this times
- the frozen backbone forward (``forward_intermediates``, 4 layers, final norm, no grad), and
- the head forward + loss + backward on those features (4 maps at stride 16, ADE20K-like targets),
and prints seconds per image and the ratio head / backbone.

    python benchmarks/m2f_head.py --device cpu --iters 1 --backbones s
    python benchmarks/m2f_head.py --device cuda            # batch 8, 10 timed steps after 3
    python benchmarks/m2f_head.py --device cuda --amp      # bf16 autocast
    python benchmarks/m2f_head.py --quick      # CPU smoke run: ViT-S, batch 1, 256 px, one iteration

Defaults: batch 2, 5 timed steps after 1 on CPU; batch 8, 10 after 3 on CUDA, where the head's peak memory
(``torch.cuda.max_memory_allocated`` over its steps) is printed too.
The last line is the head / backbone time ratio of the last backbone listed.
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

BACKBONES = {
    "s": ("vit_small_patch16_dinov3", [2, 5, 8, 11]),
    "l": ("vit_large_patch16_dinov3", [4, 11, 17, 23]),
}


def bench(name: str, indices: list[int], args, device: torch.device) -> float:
    import timm

    backbone = timm.create_model(name, num_classes=0, pretrained=False).to(device).eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()

    def backbone_forward():
        with torch.no_grad(), amp:
            return backbone.forward_intermediates(
                x, indices=indices, norm=True, return_prefix_tokens=True, intermediates_only=True
            )

    t_backbone = timed(backbone_forward, device, args.iters, args.warmup)
    inter = backbone_forward()
    maps = [m.float() for m, _ in inter]
    channels = [m.shape[1] for m in maps]
    feats = Features(maps=maps, cls=[p[:, 0].float() for _, p in inter], strides=[16] * 4, channels=channels,
                     patch_size=16, padded_size=(args.size, args.size))

    head = Mask2FormerHead(channels, feats.strides, num_classes=args.num_classes, hidden_dim=args.hidden).to(device).train()
    targets = {"mask": ade_like_masks(args.batch, args.size, args.num_classes, device)}

    def head_step():
        with amp:
            out = head(feats, (args.size, args.size))
            loss = sum(head.loss(out, targets).values())
        loss.backward()
        head.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    t_head = timed(head_step, device, args.iters, args.warmup)
    peak = peak_memory_mib(device)
    n_params = sum(p.numel() for p in head.parameters())
    n_bb = sum(p.numel() for p in backbone.parameters())
    per_img = 1.0 / args.batch
    print(
        f"{name}: backbone {n_bb / 1e6:.1f}M params fwd {t_backbone * per_img * 1e3:.1f} ms/img | "
        f"M2F head (hidden {args.hidden}) {n_params / 1e6:.2f}M params fwd+bwd {t_head * per_img * 1e3:.1f} ms/img | "
        f"ratio head/backbone {t_head / t_backbone:.2f}"
        + ("" if peak is None else f" | head step peak CUDA memory {peak:.0f} MiB")
    )
    return t_head / t_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (5 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (1 on CPU, 3 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="2 on CPU, 8 on CUDA")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--backbones", default="s,l", help="comma list of: " + ",".join(BACKBONES))
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for backbone and head")
    parser.add_argument("--quick", action="store_true", help="ViT-S only, batch 1, 256 px, one iteration")
    args = parser.parse_args()
    if args.quick:
        args.backbones, args.batch, args.size, args.iters = "s", 1, 256, 1
    device_defaults(args, cpu=dict(iters=5, warmup=1, batch=2), cuda=dict(iters=10, warmup=3, batch=8))
    device = torch.device(args.device)
    print(f"device {describe(device)}, batch {args.batch}, {args.size}px, iters {args.iters} after {args.warmup}, "
          f"amp {args.amp}")
    for key in args.backbones.split(","):
        ratio = bench(*BACKBONES[key.strip()], args, device)
    print(f"m2f head fwd+bwd / frozen {BACKBONES[key.strip()][0]} fwd: {ratio:.2f}x")


if __name__ == "__main__":
    main()
