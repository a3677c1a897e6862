"""Counts shared by every process, for losses normalised by the number of targets."""

import torch
import torch.distributed as dist
from torch import Tensor


def average_over_processes(count: int | float | Tensor, device: torch.device | str | None = None) -> Tensor:
    """``count`` averaged over all processes (all_reduce when distributed), clamped to ``>= 1``.

    Every rank then divides its loss by the same number, as DETR and Mask2Former do; a rank whose batch has
    no target still takes part in the all_reduce, so no process waits on another.
    """
    n = torch.as_tensor(count, dtype=torch.float32, device=device).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1.0)
