import math

import pytest

from heads import LinearSegHead
from backbones import build_backbone
from tasks.optim import build_optimizer, param_groups, warmup_schedule


def test_warmup_cosine_by_hand():
    f = warmup_schedule(total_steps=110, warmup_steps=10, warmup_ratio=0.0)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.0)
    poly = warmup_schedule(100, 0, schedule="poly", power=0.9, min_lr_ratio=0.1)
    assert poly(50) == pytest.approx(0.1 + 0.9 * 0.5 ** 0.9)
    with pytest.raises(ValueError, match="unknown schedule"):
        warmup_schedule(10, 0, schedule="step")


def test_param_groups_split_lr_and_decay():
    backbone = build_backbone("vit_test", freeze="last_n", last_n=1)
    head = LinearSegHead(backbone.channels, backbone.strides, 3)
    groups = {g["name"]: g for g in param_groups(head, backbone, lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["head"]["lr"] == 1e-3
    assert groups["head_no_decay"]["weight_decay"] == 0.0 and groups["head"]["weight_decay"] == 0.05
    assert all(p.ndim > 1 for p in groups["head"]["params"])
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert sum(p.numel() for g in ("backbone", "backbone_no_decay") for p in groups[g]["params"]) == trainable
    frozen = build_backbone("vit_test")
    names = {g["name"] for g in param_groups(head, frozen, 1e-3, 0.05, 0.1)}
    assert names == {"head", "head_no_decay"}


def test_scheduler_steps_the_lr():
    backbone = build_backbone("vit_test")
    head = LinearSegHead(backbone.channels, backbone.strides, 3)
    config = build_optimizer(head, backbone, total_steps=20, lr=1.0, warmup_steps=10, warmup_ratio=0.0)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.05
