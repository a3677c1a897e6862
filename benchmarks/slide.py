"""Batched sliding window vs the one-crop-at-a-time loop (mmseg / Meta), on the same model and images.

    python benchmarks/slide.py [--backbone vits16] [--device cuda] [--batch-size 8] [--iters 3]

For each image size it times: the per-crop loop, our ``slide_inference`` (crops of all windows stacked,
``batch_size`` per forward) and, as the lower bound, the forwards alone over the pre-cut crops in batches
of ``batch_size`` (no cutting, no stitching). Random-init backbone + linear head (150 classes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backbones import build_backbone  # noqa: E402
from heads import LinearSegHead  # noqa: E402
from tasks.inference import slide_inference, window_starts  # noqa: E402
from tasks.predictor import DenseModel  # noqa: E402


def per_crop_loop(model, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """The reference loop: one window per forward, sums and counts on the image's device."""
    _, height, width = image.shape
    total, count = None, torch.zeros(1, height, width, device=image.device)
    for y in window_starts(height, crop, stride):
        for x in window_starts(width, crop, stride):
            out = model(image[None, :, y:y + crop, x:x + crop])[0]
            total = torch.zeros(out.shape[0], height, width, device=image.device) if total is None else total
            total[:, y:y + crop, x:x + crop] += out
            count[:, y:y + crop, x:x + crop] += 1
    return total / count


def timed(fn, device: torch.device, iters: int) -> float:
    """Median wall time of ``fn`` over ``iters`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vits16", help="backbone name (random init), e.g. vits16, vit_test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--stride", type=int, default=341)
    parser.add_argument("--sizes", nargs="+", default=["512x683", "1024x2048"], help="HxW image sizes")
    parser.add_argument("--num-classes", type=int, default=150)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, weights=None)
    head = LinearSegHead(backbone.channels, backbone.strides, args.num_classes)
    model = DenseModel(backbone, head, "segmentation").to(device).eval()
    print(f"backbone {args.backbone} (random init), linear head, {args.num_classes} classes, device {device}, "
          f"crop {args.crop}, stride {args.stride}, batch size {args.batch_size}, median of {args.iters}")
    total_loop = total_slide = 0.0
    with torch.inference_mode():
        for size in args.sizes:
            height, width = (int(v) for v in size.lower().split("x"))
            image = torch.randn(3, height, width, device=device)
            windows = [(y, x) for y in window_starts(height, args.crop, args.stride)
                       for x in window_starts(width, args.crop, args.stride)]
            crops = torch.stack([image[:, y:y + args.crop, x:x + args.crop] for y, x in windows])

            def forwards_only():
                for start in range(0, len(crops), args.batch_size):
                    model(crops[start:start + args.batch_size])

            loop = timed(lambda: per_crop_loop(model, image, args.crop, args.stride), device, args.iters)
            slide = timed(lambda: slide_inference(model, [image], args.crop, args.stride, args.batch_size),
                          device, args.iters)
            bound = timed(forwards_only, device, args.iters)
            diff = (per_crop_loop(model, image, args.crop, args.stride)
                    - slide_inference(model, [image], args.crop, args.stride, args.batch_size)[0]).abs().max()
            total_loop += loop
            total_slide += slide
            print(f"{height}x{width}: {len(windows)} windows | per-crop loop {loop * 1000:.1f} ms | "
                  f"batched slide {slide * 1000:.1f} ms ({loop / slide:.2f}x) | batched forwards only "
                  f"{bound * 1000:.1f} ms | max abs diff {float(diff):.2g}")
    print(f"slide speedup vs per-crop loop: {total_loop / total_slide:.2f}x")


if __name__ == "__main__":
    main()
