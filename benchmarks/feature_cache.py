"""Training epoch with and without the frozen-feature cache, side by side.

    python benchmarks/feature_cache.py [--backbone vits16] [--size 512] [--images N] [--batch-size B] [--device cuda]
    python benchmarks/feature_cache.py --quick     # CPU smoke run: vit_test, 256 px, 8 images

Defaults: 16 images, batch 4, one timed epoch on CPU; 64 images, batch 16, best of 2 timed epochs on CUDA (the
augmentation runs in the main process unless ``--workers``, as on CPU).

For a linear segmentation head (BatchNorm + 1x1 conv, 150 classes, loss at full resolution) and a linear
classifier (1000 classes, class token + mean patch token; its cache stores pooled maps) on a random-init frozen
backbone, it times one training epoch over ``--images`` pre-rendered synthetic scenes (crops of ``--size``):
the plain epoch (augmentation, backbone forward, head forward + backward + AdamW step), the epoch that builds
the cache (the first), and an epoch read from the cache (every later one). The last line is the
linear-segmentation speedup of a cached epoch over a plain one, with the head's default loss (every pixel,
exact); with ``--points N`` (default 4096; 0: skip) the line before it is the same speedup with the loss
estimated on N sampled pixels per image (``head.loss_points=N``, not a default of any recipe).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from dense_data.feature_cache import FeatureCache, collate_cached  # noqa: E402
from benchmarks.common import describe, device_defaults, head_training_step, sync  # noqa: E402
from dense_data.synthetic import make_scene  # noqa: E402
from dense_data.transforms import Transformed, collate, train_transform  # noqa: E402
from tasks import ClassificationTask, SegmentationTask  # noqa: E402


class Scenes(Dataset):
    """Scenes rendered once (so the timings leave out rendering, as a real loader's decode is left out)."""

    def __init__(self, num: int, size: int, num_classes: int):
        self.items = [make_scene(i, (size, size)) for i in range(num)]
        for item in self.items:
            item["label"] = item["label"] % num_classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def epoch(task, loader, device) -> float:
    """Seconds for one pass of training steps (as ``DenseTask.training_step`` runs them) over ``loader``."""
    optimizer = torch.optim.AdamW(task.head.parameters(), lr=1e-3)
    task.train()
    sync(device)
    start = time.perf_counter()
    for batch in loader:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if "features" in batch:
            batch["features"] = {k: [t.to(device) for t in v] for k, v in batch["features"].items()}
        head_training_step(task, batch, optimizer)
    sync(device)
    return time.perf_counter() - start


def compare(kind: str, args, scenes: Scenes, root: Path, device: torch.device, points: int = 0) -> float:
    targets = ("mask",) if kind == "seg" else ("label",)
    backbone = {"name": args.backbone, "out_indices": [-1]}
    if kind == "seg":
        head = {"_target_": "heads.LinearSegHead", "loss_points": points}
        task = SegmentationTask(backbone=backbone, head=head, num_classes=150)
    else:
        task = ClassificationTask(backbone=backbone, head={"_target_": "heads.LinearClassifier"}, num_classes=1000)
    task.to(device)
    pipeline = train_transform(targets, args.size, args.size, (0.5, 2.0), True, True)
    plain = DataLoader(Transformed(scenes, pipeline, targets), batch_size=args.batch_size, shuffle=True,
                       collate_fn=collate, num_workers=args.workers)
    epoch(task, plain, device)  # warm-up
    plain_s = min(epoch(task, plain, device) for _ in range(args.repeats))

    cache = FeatureCache(root, args.backbone, task.backbone, scenes, pipeline, targets, views=1,
                         pool=kind == "cls", num_classes=task.num_classes)
    start = time.perf_counter()
    cached_set = cache.prepare(device, batch_size=args.batch_size)
    build_s = time.perf_counter() - start
    cached = DataLoader(cached_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate_cached,
                        num_workers=args.workers)
    epoch(task, cached, device)
    cached_s = min(epoch(task, cached, device) for _ in range(args.repeats))
    size = sum(s.path.stat().st_size for s in cached_set.shards) / len(cached_set) / 2 ** 10
    per = 1000 / len(scenes)
    label = f"{kind}, loss on {points} points" if points else kind
    print(f"{label:>3}: plain epoch {plain_s * per:7.1f} ms/img | building the cache {build_s * per:7.1f} ms/img | "
          f"cached epoch {cached_s * per:6.1f} ms/img | {size:.0f} KiB/img on disk | speedup {plain_s / cached_s:.1f}x")
    return plain_s / cached_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vits16", help="backbone name (random init), e.g. vits16, vit_test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="training crop (px)")
    parser.add_argument("--images", type=int, default=None, help="16 on CPU, 64 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="4 on CPU, 16 on CUDA")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--repeats", type=int, default=None,
                        help="epochs timed after the warm-up, best kept (1 on CPU, 2 on CUDA)")
    parser.add_argument("--points", type=int, default=4096,
                        help="also time linear seg with head.loss_points=N (0: only the exact loss)")
    parser.add_argument("--cache-dir", default=None, help="where the cache goes (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: vit_test, 256 px, 8 images, 1024 points")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.size, args.images, args.points = "vit_test", 256, args.images or 8, 1024
    device_defaults(args, cpu=dict(images=16, batch_size=4, repeats=1), cuda=dict(images=64, batch_size=16, repeats=2))
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"{args.backbone}, {args.size} px crops, {args.images} images, batch {args.batch_size}, {describe(device)}, "
          f"{args.workers} loader workers")
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        cls = compare("cls", args, Scenes(args.images, args.size, 1000), Path(tmp), device)
        seg_scenes = Scenes(args.images, args.size, 150)
        seg = compare("seg", args, seg_scenes, Path(tmp), device)
        points = args.points and compare("seg", args, seg_scenes, Path(tmp), device, points=args.points)
    print(f"linear classifier epoch speedup: {cls:.1f}x")
    if points:
        print(f"feature cache epoch speedup (loss on {args.points} points): {points:.1f}x")
    print(f"feature cache epoch speedup: {seg:.1f}x")


if __name__ == "__main__":
    main()
