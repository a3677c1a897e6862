"""DETRHead (two-stage deformable DETR) vs PlainDETRHead (Meta's detector) at their COCO recipes: parameters and
head forward + loss + backward time per image on features of a frozen ViT (random, no backbone run).

DETRHead reads the 4 layers of a ViT-L (4 x 1024 channels); PlainDETRHead reads them twice (global view + windows,
8 x 1024), as in ``task=coco_detr`` and ``task=coco_plain_detr`` (on ViT-L here; Meta's detector runs on ViT-7B).

    python benchmarks/detr_heads.py --device cpu          # 512 px, one timed step after one
    python benchmarks/detr_heads.py --device cuda         # 1024 px, 10 timed steps after 3

On CUDA each head's peak memory (``torch.cuda.max_memory_allocated`` over its steps) is printed too.
The last line is ``plain-detr vs detr step time: <ratio>x``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones.features import Features  # noqa: E402
from benchmarks.common import describe, device_defaults, peak_memory_mib, reset_peak_memory, timed  # noqa: E402
from heads.detr import DETRHead, PlainDETRHead  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def recipe(head: str, task: str) -> dict:
    """Head arguments of ``conf/head/<head>.yaml`` updated by ``conf/task/<task>.yaml``."""
    args = yaml.safe_load((CONF / "head" / f"{head}.yaml").read_text())
    args.update(yaml.safe_load((CONF / "task" / f"{task}.yaml").read_text()).get("head", {}))
    args.pop("_target_")
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="square input side, pixels (512 on CPU, 1024 on CUDA)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (1 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (1 on CPU, 3 on CUDA)")
    parser.add_argument("--channels", type=int, default=1024, help="ViT width (ViT-L: 1024)")
    args = parser.parse_args()
    device_defaults(args, cpu=dict(size=512, iters=1, warmup=1), cuda=dict(size=1024, iters=10, warmup=3))
    device = torch.device(args.device)
    print(f"{describe(device)}, one {args.size} px image, {args.iters} timed steps after {args.warmup}")
    side = args.size // 16
    g = torch.Generator().manual_seed(0)
    targets = {"boxes": [torch.tensor([[40.0, 60.0, 200.0, 300.0], [250.0, 100.0, 400.0, 180.0]], device=device)],
               "labels": [torch.tensor([3, 7], device=device)]}
    seconds: dict[str, float] = {}
    for name, cls, head_file, task, views in (("DETRHead", DETRHead, "detr", "coco_detr", 1),
                                              ("PlainDETRHead", PlainDETRHead, "plain_detr", "coco_plain_detr", 2)):
        n = 4 * views
        head = cls([args.channels] * n, [16] * n, num_classes=80, **recipe(head_file, task)).to(device).train()
        maps = [torch.randn(1, args.channels, side, side, generator=g).to(device) for _ in range(n)]
        feats = Features(maps, None, [16] * n, [args.channels] * n, 16, (args.size, args.size))

        def step():
            losses = head.loss(head(feats, feats.padded_size), targets)
            sum(losses.values()).backward()
            head.zero_grad(set_to_none=True)

        reset_peak_memory(device)
        seconds[name] = timed(step, device, args.iters, args.warmup)
        peak = peak_memory_mib(device)
        params = sum(p.numel() for p in head.parameters()) / 1e6
        print(f"{name} ({task}): {params:.1f}M params, forward+loss+backward {seconds[name]:.3f} s/img "
              f"at {args.size} px"
              + ("" if peak is None else f", peak CUDA memory {peak:.0f} MiB"))
    print(f"plain-detr vs detr step time: {seconds['PlainDETRHead'] / seconds['DETRHead']:.2f}x")


if __name__ == "__main__":
    main()
