"""Batched sliding window vs the one-crop-at-a-time loop (mmseg / Meta), on the same model and images.

    python benchmarks/slide.py [--backbone vits16] [--device cuda] [--batch-size 8] [--iters 3] [--quick]

For each image size it times: the per-crop loop, our ``slide_inference`` with full-resolution stitching
(``stitch=full``, Meta's) as ``Predictor`` runs it (each window's 1/16 logits upsampled as they are stitched),
from the model's upsampled window outputs, and for labels only (``return_probs=False``), with stitching on the head's 1/16 grid (``stitch=native``), and, as the
lower bounds, the forwards alone over the pre-cut crops in batches of ``batch_size`` (no cutting, no stitching)
giving full-resolution and native outputs (in turns, fastest of ``--iters`` rounds). Random-init backbone + linear
head (150 classes). It reports the stitching overhead (slide time / forwards-alone time, per stitching), the
largest differences between the stitchings, and ends with ``slide stitching overhead over batched forwards:
N.NNx`` (full stitching as ``Predictor`` runs it over the forwards giving full-resolution outputs, all sizes).
``--quick``: ``vit_test`` backbone, one 512x1024 image, two rounds (a CPU smoke run).
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
from benchmarks.common import describe, sync  # noqa: E402
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


def timed(fns: dict, device: torch.device, iters: int) -> dict[str, float]:
    """Fastest wall time of each function over ``iters`` rounds after one warm-up round.

    The functions take turns within each round and the minimum is kept, so load from other processes on a
    shared machine hits all of them alike and inflates none of the figures.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(iters + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


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
    parser.add_argument("--quick", action="store_true", help="vit_test, one 512x1024 image, two rounds")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.sizes, args.iters = "vit_test", ["512x1024"], 2

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, weights=None)
    head = LinearSegHead(backbone.channels, backbone.strides, args.num_classes)
    model = DenseModel(backbone, head, "segmentation").to(device).eval()
    native = model.output_stride
    print(f"backbone {args.backbone} (random init), linear head, {args.num_classes} classes, "
          f"device {describe(device)}, crop {args.crop}, stride {args.stride}, batch size {args.batch_size}, fastest of {args.iters}")
    total = {"loop": 0.0, "full": 0.0, "windows": 0.0, "labels": 0.0, "native": 0.0, "bound": 0.0, "bound_native": 0.0}
    with torch.inference_mode():
        for size in args.sizes:
            height, width = (int(v) for v in size.lower().split("x"))
            image = torch.randn(3, height, width, device=device)
            windows = [(y, x) for y in window_starts(height, args.crop, args.stride)
                       for x in window_starts(width, args.crop, args.stride)]
            crops = torch.stack([image[:, y:y + args.crop, x:x + args.crop] for y, x in windows])

            def forwards_only(native_outputs: bool = False):
                for start in range(0, len(crops), args.batch_size):
                    model(crops[start:start + args.batch_size], native=native_outputs)

            def slide_full():  # as Predictor: each window's 1/16 logits upsampled as they are stitched
                return slide_inference(lambda x: model(x, native=True, cut=False), [image], args.crop, args.stride,
                                       args.batch_size, output_stride=native, upsample=True)[0]

            def slide_labels():  # as Predictor(return_probs=False), predict.py: the mean in bands of rows, argmax
                return slide_inference(lambda x: model(x, native=True, cut=False), [image], args.crop, args.stride,
                                       args.batch_size, output_stride=native, upsample=True, labels=True)[0]

            def slide_full_windows():  # the same stitching from upsampled window outputs (fn = the model)
                return slide_inference(model, [image], args.crop, args.stride, args.batch_size)[0]

            def slide_native():
                return slide_inference(lambda x: model(x, native=True), [image], args.crop, args.stride,
                                       args.batch_size, output_stride=native)[0]

            times = timed({"loop": lambda: per_crop_loop(model, image, args.crop, args.stride),
                           "full": slide_full, "windows": slide_full_windows, "labels": slide_labels,
                           "bound": forwards_only,
                           "native": slide_native, "bound_native": lambda: forwards_only(True)}, device, args.iters)
            for key, value in times.items():
                total[key] += value
            full = slide_full()
            diff_loop = (per_crop_loop(model, image, args.crop, args.stride) - full).abs().max()
            diff_windows = (slide_full_windows() - full).abs().max()
            coarse = slide_native()
            diff_native = (coarse - full).abs().max()
            agree = (coarse.argmax(0) == full.argmax(0)).float().mean()
            del full, coarse
            print(f"{height}x{width}: {len(windows)} windows | per-crop loop {times['loop'] * 1000:.0f} ms | "
                  f"slide full {times['full'] * 1000:.0f} ms ({times['loop'] / times['full']:.2f}x the loop, "
                  f"{times['full'] / times['bound']:.2f}x its forwards {times['bound'] * 1000:.0f} ms, "
                  f"{times['full'] / times['bound_native']:.2f}x the native forwards, max diff vs loop "
                  f"{float(diff_loop):.2g}) | slide full from upsampled windows {times['windows'] * 1000:.0f} ms "
                  f"({times['windows'] / times['bound']:.2f}x the forwards, max diff {float(diff_windows):.2g}) "
                  f"| labels only {times['labels'] * 1000:.0f} ms "
                  f"({times['labels'] / times['bound']:.2f}x the forwards) "
                  f"| slide native {times['native'] * 1000:.0f} ms "
                  f"({times['loop'] / times['native']:.2f}x the loop, {times['native'] / times['bound_native']:.2f}x "
                  f"its forwards {times['bound_native'] * 1000:.0f} ms, max |native - full| {float(diff_native):.3g} "
                  f"on logits up to {float(slide_full().abs().max()):.3g}, same label on {float(agree) * 100:.1f}% of pixels)")
    print(f"slide full stitching, windows upsampled as stitched vs from upsampled windows: "
          f"{total['windows'] / total['full']:.2f}x")
    print(f"slide full stitching over native forwards (no upsampling): {total['full'] / total['bound_native']:.2f}x")
    print(f"slide native vs full stitching: {total['full'] / total['native']:.2f}x")
    print(f"slide speedup vs per-crop loop: {total['loop'] / total['full']:.2f}x")
    print(f"slide stitching overhead over batched forwards: {total['full'] / total['bound']:.2f}x")


if __name__ == "__main__":
    main()
