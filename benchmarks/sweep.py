"""Cost of one training step of a 13-head sweep against one head, on the same frozen backbone pass.

    python benchmarks/sweep.py [--task both|cls|seg] [--backbone vits16] [--size N] [--batch-size N] [--device cuda]

A step is what ``DenseTask.training_step`` runs: the frozen backbone's forward on a batch of random images, the
head(s) forward and loss, backward, an AdamW step. ``cls``: linear classifiers (1000 classes, class token + mean
patch token; Meta's ImageNet protocol, 224 px); ``seg``: linear segmentation heads (150 classes, loss at full
resolution; 512 px); ``both`` (the default): ``cls`` then ``seg``. The 13 heads are Meta's learning-rate grid
(``conf/sweep/lr.yaml``). For ``seg`` the heads' default loss (every pixel, exact) is timed, and, with ``--points N``
(default 4096; 0: skip), the same pair of steps with the loss estimated on N sampled pixels per image
(``head.loss_points=N``, not a default of any recipe). Each ratio of the sweep's step time to the single head's
(wall time, medians after ``--warmup`` steps) gets its own line; the last line is the last task's exact one. On a
CPU the process's CPU time per step is printed too: on a machine shared with other jobs it moves less than the wall
time (exact with one thread, ``OMP_NUM_THREADS=1``). Defaults: batch 8 (cls) / 2 (seg), 3 steps after 1 on a CPU;
batch 32 / 8, 10 steps after 3 on a GPU. ``--quick``: the tiny ``vit_test`` backbone, 64 / 128 px, batch 2, one
step (a smoke run).
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

from benchmarks.common import describe, device_defaults, head_training_step, sync  # noqa: E402
from tasks import ClassificationTask, SegmentationTask  # noqa: E402
from tasks.sweep import META_LEARNING_RATES, sweep_task  # noqa: E402


# (image size, batch size) per task when not given: on a CPU, on CUDA, and for --quick
DEFAULTS = {"cls": {"cpu": (224, 8), "cuda": (224, 32), "quick": (64, 2)},
            "seg": {"cpu": (512, 2), "cuda": (512, 8), "quick": (128, 2)}}


def step_time(task, batch: dict, device: torch.device, iters: int, warmup: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one training step over ``iters`` steps after ``warmup`` steps."""
    optimizer = torch.optim.AdamW(task.head.parameters(), lr=1e-3)
    task.train()

    def step():
        head_training_step(task, batch, optimizer)

    for _ in range(warmup):
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


def sweep_ratios(task: str, args, device: torch.device) -> list[str]:
    """Time one head and the 13-head sweep for ``task`` (``cls`` or ``seg``); one ``<name>: <ratio>x`` line each."""
    regime = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    default_size, default_batch = DEFAULTS[task][regime]
    size, batch_size = args.size or default_size, args.batch_size or default_batch
    torch.manual_seed(0)
    backbone = {"name": args.backbone, "out_indices": [-1]}
    if task == "cls":
        num_classes, targets, plain_cls = 1000, ["label"], ClassificationTask
        head = {"_target_": "heads.LinearClassifier"}
        batch = {"label": torch.randint(0, num_classes, (batch_size,), device=device)}
    else:
        num_classes, targets, plain_cls = 150, ["mask"], SegmentationTask
        head = {"_target_": "heads.LinearSegHead"}
        batch = {"mask": torch.randint(0, num_classes, (batch_size, size, size), device=device)}
    batch["image"] = torch.randn(batch_size, 3, size, size, device=device)
    batch["meta"] = [{} for _ in range(batch_size)]
    print(f"{args.backbone}, {task}, {size} px, batch {batch_size}, {describe(device)}")
    variants = [("", head)]
    if task == "seg" and args.points:
        variants.insert(0, (f" (loss on {args.points} points)", {**head, "loss_points": args.points}))
    lines = []
    for label, head_config in variants:
        kwargs = dict(backbone=backbone, head=head_config, optim={"lr": 1e-3}, num_classes=num_classes)
        single = plain_cls(**kwargs).to(device)
        swept = sweep_task(targets, sweep={"lr": list(META_LEARNING_RATES)}, **kwargs).to(device)
        (one, one_cpu), (many, many_cpu) = (step_time(t, batch, device, args.iters, args.warmup) for t in (single, swept))
        heads = len(swept.head.heads)
        print(f"one head{label}: {one * 1000:.0f} ms/step | {heads} heads: {many * 1000:.0f} ms/step")
        if device.type == "cpu":
            print(f"CPU time{label}: one head {one_cpu * 1000:.0f} ms/step | {heads} heads {many_cpu * 1000:.0f} ms/step"
                  f" | {many_cpu / one_cpu:.2f}x")
        kind = "" if task == "cls" else " linear seg"
        lines.append(f"sweep cost {heads}{kind} heads vs 1{label}: {many / one:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="backbone name (random init), e.g. vits16 (default), vit_test")
    parser.add_argument("--task", choices=("cls", "seg", "both"), default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="image size (default 224 for cls, 512 for seg)")
    parser.add_argument("--batch-size", type=int, default=None, help="cls: 8 on CPU, 32 on CUDA; seg: 2 / 8")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (3 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (1 on CPU, 3 on CUDA)")
    parser.add_argument("--points", type=int, default=4096,
                        help="seg: also time the heads with head.loss_points=N (0: only the exact loss)")
    parser.add_argument("--quick", action="store_true", help="vit_test backbone, 64 / 128 px, batch 2, one step")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.iters = args.backbone or "vit_test", 1
    args.backbone = args.backbone or "vits16"
    device_defaults(args, cpu=dict(iters=3, warmup=1), cuda=dict(iters=10, warmup=3))
    device = torch.device(args.device)
    lines = [line for task in (("cls", "seg") if args.task == "both" else (args.task,))
             for line in sweep_ratios(task, args, device)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
