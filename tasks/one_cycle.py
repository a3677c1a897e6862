"""Meta's one-cycle schedule with a warm-up (``WarmupOneCycleLR`` of dinov3's depth recipe), learning rate and beta1.

With ``T`` total steps, ``W`` warm-up steps, a group's peak ``lr`` and ``min_lr = lr / div_factor / final_div_factor``,
the rate used at step ``s`` (0-based) is::

    s <  W: lr / final_div_factor + lr * (1 + cos(pi * s / T)) / 2 * s / W
    s >= W: min_lr + (lr - min_lr) / 2 * (1 + cos(pi * (s + 1) / T))

so the warm-up climbs to about 0.75 lr (for W = T / 3) and the cosine takes it from there to ``min_lr``. AdamW's
beta1 cycles with it: 0 during the warm-up (Meta's scheduler leaves its momentum at 0 there), then from
``base_momentum`` up to ``max_momentum`` on a cosine over the remaining steps.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


class WarmupOneCycleLR(LRScheduler):
    """Per-step scheduler; each group's ``lr`` at construction is its peak. See the module docstring.

    Args:
        total_steps, warmup_steps: ``T`` and ``W``.
        div_factor, final_div_factor: ``min_lr = lr / div_factor / final_div_factor``.
        base_momentum, max_momentum: the beta1 cycle after the warm-up; ``cycle_momentum=False`` leaves beta1 alone.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int, div_factor: float = 25.0,
                 final_div_factor: float = 1000.0, base_momentum: float = 0.85, max_momentum: float = 0.95,
                 cycle_momentum: bool = True, last_epoch: int = -1):
        if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.div_factor, self.final_div_factor = float(div_factor), float(final_div_factor)
        self.base_momentum, self.max_momentum = float(base_momentum), float(max_momentum)
        self.cycle_momentum = bool(cycle_momentum)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The rate at ``step`` as a fraction of the peak."""
        step = min(step, self.total_steps)
        if step < self.warmup_steps:
            peak = (1.0 + math.cos(math.pi * step / self.total_steps)) / 2.0
            return 1.0 / self.final_div_factor + peak * step / self.warmup_steps
        floor = 1.0 / self.div_factor / self.final_div_factor
        return _cos(1.0, floor, (step + 1) / self.total_steps)

    def beta1(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.0
        pct = (min(step, self.total_steps) - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return _cos(self.base_momentum, self.max_momentum, pct)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if self.cycle_momentum:
            for group in self.optimizer.param_groups:
                group["betas"] = (self.beta1(step), *group["betas"][1:])
        return [base * self.factor(step) for base in self.base_lrs]
