"""Pieces the benchmark scripts share: accelerator sync, a timing loop, ADE20K-like label maps."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Mean seconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def ade_like_masks(batch: int, size: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Piecewise-constant label maps ``(B, H, W)`` with ~10 of ``num_classes`` classes and a strip of ignore (255)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 10, (batch, 1, 8, 8), generator=g).float()
    classes = torch.randperm(num_classes, generator=g)[:10]
    mask = classes[torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()]
    mask[:, : size // 32] = 255
    return mask.to(device)


def head_training_step(task, batch: dict, optimizer: torch.optim.Optimizer) -> None:
    """One training step of a task's head as ``DenseTask.training_step`` runs it (features from the cache or the
    frozen backbone, the head's loss, an optimizer step)."""
    features = task.training_features(batch)
    outputs = task.head(features, features.padded_size)
    loss = sum(task.head.loss(outputs, task.batch_targets(batch, features.padded_size)).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
