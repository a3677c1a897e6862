"""AdamW (or SGD) with head / backbone parameter groups and a warmup + cosine (or poly, or Meta's one-cycle) schedule."""

import math

import torch
from torch import nn

from .one_cycle import WarmupOneCycleLR


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith((".bias", "cls_token", "reg_token", "query_embed.weight",
                                               "query_feat.weight", "level_embed"))


def param_groups(head: nn.Module, backbone: nn.Module, lr: float, weight_decay: float,
                 backbone_lr_mult: float, decay_all: bool = False) -> list[dict]:
    """Four groups: head / backbone x decay / no decay (biases, norms, tokens, embeddings). Frozen params are left out.

    ``decay_all``: weight decay on every parameter (Meta's depth recipe decays the whole decoder).
    """
    groups = []
    for module, module_lr, prefix in ((head, lr, "head"), (backbone, lr * backbone_lr_mult, "backbone")):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if decay_all or not _no_decay(n, p)]
        no_decay = [p for n, p in named if not decay_all and _no_decay(n, p)]
        if decay:
            groups.append({"params": decay, "lr": module_lr, "weight_decay": weight_decay, "name": f"{prefix}"})
        if no_decay:
            groups.append({"params": no_decay, "lr": module_lr, "weight_decay": 0.0, "name": f"{prefix}_no_decay"})
    return groups


def warmup_schedule(total_steps: int, warmup_steps: int, warmup_ratio: float = 1e-3, schedule: str = "cosine",
                    min_lr_ratio: float = 0.0, power: float = 1.0):
    """``step -> lr factor``: linear warmup from ``warmup_ratio`` to 1, then cosine or poly decay to ``min_lr_ratio``."""
    if schedule not in ("cosine", "poly", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; valid: cosine, poly, constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_ratio + (1.0 - warmup_ratio) * step / max(warmup_steps, 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else (1.0 - progress) ** power
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return factor


def scheduled_optimizer(groups: list[dict], total_steps: int, lr: float = 1e-3, betas=(0.9, 0.999),
                        warmup_steps: int = 0, warmup_ratio: float = 1e-3, schedule: str = "cosine",
                        min_lr_ratio: float = 0.0, power: float = 1.0, name: str = "adamw", momentum: float = 0.9,
                        one_cycle: dict | None = None):
    """AdamW (or SGD with momentum) over ``groups`` + a per-step ``LambdaLR`` (or ``schedule="one_cycle"``: Meta's
    ``WarmupOneCycleLR``, its options in ``one_cycle``), in the form Lightning's ``configure_optimizers`` returns."""
    if name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    elif name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid: adamw, sgd")
    if schedule == "one_cycle":
        scheduler = WarmupOneCycleLR(optimizer, total_steps, warmup_steps, **(one_cycle or {}))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    factor = warmup_schedule(total_steps, warmup_steps, warmup_ratio, schedule, min_lr_ratio, power)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_optimizer(head: nn.Module, backbone: nn.Module, total_steps: int, lr: float = 1e-3,
                    weight_decay: float = 1e-3, backbone_lr_mult: float = 0.1, decay_all: bool = False, **kwargs):
    """``scheduled_optimizer`` over the head / backbone parameter groups (``kwargs``: its other arguments;
    ``decay_all``: weight decay on biases and norms too, as Meta's depth recipe)."""
    groups = param_groups(head, backbone, lr, weight_decay, backbone_lr_mult, decay_all)
    return scheduled_optimizer(groups, total_steps, lr, **kwargs)
