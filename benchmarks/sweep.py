"""Cost of one training step of a 13-head sweep against one head, on the same frozen backbone pass.

    python benchmarks/sweep.py [--backbone vits16] [--task cls|seg] [--size 224] [--batch-size 8] [--device cuda]

A step is what ``DenseTask.training_step`` runs: the frozen backbone's forward on a batch of random images, the
head(s) forward and loss, backward, an AdamW step. ``cls``: linear classifiers (1000 classes, class token + mean
patch token; Meta's ImageNet protocol, 224 px); ``seg``: linear segmentation heads (150 classes, loss at full
resolution; 512 px). The 13 heads are Meta's learning-rate grid (``conf/sweep/lr.yaml``). The last line is the
ratio of the sweep's step time to the single head's (wall time, medians). On a CPU the process's CPU time per step
is printed too: on a machine shared with other jobs it moves less than the wall time (exact with one thread,
``OMP_NUM_THREADS=1``). For ``seg`` the heads' default loss (every pixel, exact) is
timed, and, with ``--points N`` (default 4096; 0: skip), the same pair of steps with the loss estimated on N
sampled pixels per image (``head.loss_points=N``, not a default of any recipe), each ratio on its own line.
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

from benchmarks.common import head_training_step, sync  # noqa: E402
from tasks import ClassificationTask, SegmentationTask  # noqa: E402
from tasks.sweep import META_LEARNING_RATES, sweep_task  # noqa: E402


def step_time(task, batch: dict, device: torch.device, iters: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one training step over ``iters`` steps after a warm-up."""
    optimizer = torch.optim.AdamW(task.head.parameters(), lr=1e-3)
    task.train()

    def step():
        head_training_step(task, batch, optimizer)

    step()
    walls, cpus = [], []
    for _ in range(iters):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vits16", help="backbone name (random init), e.g. vits16, vit_test")
    parser.add_argument("--task", choices=("cls", "seg"), default="cls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="image size (default 224 for cls, 512 for seg)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--points", type=int, default=4096,
                        help="seg: also time the heads with head.loss_points=N (0: only the exact loss)")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or (224 if args.task == "cls" else 512)
    torch.manual_seed(0)
    backbone = {"name": args.backbone, "out_indices": [-1]}
    if args.task == "cls":
        num_classes, targets, plain_cls = 1000, ["label"], ClassificationTask
        head = {"_target_": "heads.LinearClassifier"}
        batch = {"label": torch.randint(0, num_classes, (args.batch_size,), device=device)}
    else:
        num_classes, targets, plain_cls = 150, ["mask"], SegmentationTask
        head = {"_target_": "heads.LinearSegHead"}
        batch = {"mask": torch.randint(0, num_classes, (args.batch_size, size, size), device=device)}
    batch["image"] = torch.randn(args.batch_size, 3, size, size, device=device)
    batch["meta"] = [{} for _ in range(args.batch_size)]
    print(f"{args.backbone}, {args.task}, {size} px, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads")
    variants = [("", head)]
    if args.task == "seg" and args.points:
        variants.insert(0, (f" (loss on {args.points} points)", {**head, "loss_points": args.points}))
    lines = []
    for label, head_config in variants:
        kwargs = dict(backbone=backbone, head=head_config, optim={"lr": 1e-3}, num_classes=num_classes)
        single = plain_cls(**kwargs).to(device)
        swept = sweep_task(targets, sweep={"lr": list(META_LEARNING_RATES)}, **kwargs).to(device)
        (one, one_cpu), (many, many_cpu) = (step_time(task, batch, device, args.iters) for task in (single, swept))
        heads = len(swept.head.heads)
        print(f"one head{label}: {one * 1000:.0f} ms/step | {heads} heads: {many * 1000:.0f} ms/step")
        if device.type == "cpu":
            print(f"CPU time{label}: one head {one_cpu * 1000:.0f} ms/step | {heads} heads {many_cpu * 1000:.0f} ms/step"
                  f" | {many_cpu / one_cpu:.2f}x")
        lines.append(f"sweep cost {heads} heads vs 1{label}: {many / one:.2f}x")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
