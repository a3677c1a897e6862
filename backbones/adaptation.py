"""How much of a backbone trains: ``frozen``, ``last_n`` blocks, ``all``, or ``lora`` adapters.

LoRA is a parametrization of the attention weights (``W + B @ A * alpha / r``). timm's DINOv3 attention
reads ``qkv.weight`` directly inside ``F.linear`` (to add its separate q/v biases), so wrapping the
``nn.Linear`` modules (what ``peft`` does) would leave ``qkv`` untouched; a parametrization is seen by
every reader of ``.weight``.
"""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

FREEZE_MODES = ("frozen", "last_n", "all", "lora")


class LoRA(nn.Module):
    """Low-rank update of a ``(out, in)`` weight: ``W + (B @ A) * alpha / rank``; ``B`` starts at zero."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float, targets=("attn.qkv", "attn.proj")) -> int:
    """Add LoRA to every linear layer whose name ends with one of ``targets``; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(targets):
            parametrize.register_parametrization(
                module, "weight", LoRA(module.out_features, module.in_features, rank, alpha))
            count += 1
    if count == 0:
        raise ValueError(f"LoRA found no linear layers named *{targets} in {type(model).__name__}")
    return count


def apply_freeze(model: nn.Module, mode: str, kind: str, last_n: int = 0,
                 lora_rank: int = 8, lora_alpha: float = 16.0) -> None:
    """Set ``requires_grad`` on a timm DINOv3 model according to ``mode``.

    ``last_n`` trains the last ``last_n`` ViT blocks (or ConvNeXt stages) and the final norm.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"unknown freeze mode {mode!r}; valid: {', '.join(FREEZE_MODES)}")
    model.requires_grad_(mode == "all")
    if mode == "last_n":
        stages = model.blocks if kind == "vit" else model.stages
        if not 1 <= last_n <= len(stages):
            raise ValueError(f"freeze=last_n needs 1 <= last_n <= {len(stages)}, got last_n={last_n}")
        for stage in stages[len(stages) - last_n:]:
            stage.requires_grad_(True)
        norm = getattr(model, "norm", None)
        if isinstance(norm, nn.Module):
            norm.requires_grad_(True)
    elif mode == "lora":
        if kind != "vit":
            raise ValueError("freeze=lora adapts ViT attention; use freeze=last_n or all for ConvNeXt")
        add_lora(model, lora_rank, lora_alpha)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
