"""Pieces the benchmark scripts share: CPU / GPU default sizes, accelerator sync, a timing loop, peak GPU memory,
ADE20K-like label maps."""

from __future__ import annotations

import time

import torch


def device_defaults(args, cpu: dict, cuda: dict) -> None:
    """Give each option left at None (``args.<key>``) its CPU default, or its GPU default when ``args.device`` is
    CUDA: sizes and repeats that keep a GPU busy instead of timing kernel-launch overhead and one noisy step."""
    table = cuda if torch.device(args.device).type == "cuda" else cpu
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def describe(device: torch.device) -> str:
    """The device in words for a benchmark's first line: the GPU's name, or the CPU thread count."""
    if device.type == "cuda":
        return f"{device.type} ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
    return f"{device.type} ({torch.get_num_threads()} threads, torch {torch.__version__})"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak of :func:`peak_memory_mib` (CUDA only; a no-op on CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Most CUDA memory held by tensors since :func:`reset_peak_memory` (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


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
