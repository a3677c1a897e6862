"""DPT depth head and depth losses: shapes, gradients, bins, SiLog / gradient loss against numpy, overfit."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pytest
import torch

from backbones.features import Features
from heads.depth_losses import GradientMatchingLoss, SiLogLoss
from heads.dpt import DPTHead, bin_centres, default_features

C = 64
TINY = dict(features=32, post_channels=[16, 16, 32, 32], head_hidden=16)


def vit_features(b=2, h=80, w=112, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    hp, wp = math.ceil(h / 16), math.ceil(w / 16)
    maps = [torch.randn(b, c, hp, wp, generator=g) for _ in range(4)]
    cls = [torch.randn(b, c, generator=g) for _ in range(4)]
    return Features(
        maps=maps, cls=cls, strides=[16] * 4, channels=[c] * 4, patch_size=16, padded_size=(16 * hp, 16 * wp)
    )


def convnext_features(b=2, h=80, w=112, channels=(16, 24, 32, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    strides = [4, 8, 16, 32]
    maps = [torch.randn(b, c, math.ceil(h / s), math.ceil(w / s), generator=g) for c, s in zip(channels, strides)]
    return Features(maps=maps, cls=None, strides=strides, channels=list(channels), patch_size=4, padded_size=(h, w))


def assert_all_grads(head):
    for name, p in head.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"


# ------------------------------------------------------------------------------------------------ shapes / grads
@pytest.mark.parametrize("readout", ["ignore", "add", "project"])
def test_vit_shapes_and_gradients(readout):
    feats = vit_features()
    head = DPTHead([C] * 4, [16] * 4, readout=readout, **TINY)
    out = head(feats, (80, 112))
    assert out["depth"].shape == (2, 1, 80, 112)
    assert head.predict(out, (80, 112)).shape == (2, 1, 80, 112)
    gt = torch.rand(2, 80, 112) * 5 + 0.5
    losses = head.loss(out, {"depth": gt})
    assert set(losses) == {"loss_silog"}
    sum(losses.values()).backward()
    assert_all_grads(head)


def test_readout_changes_output():
    feats = vit_features()
    torch.manual_seed(0)
    ignore = DPTHead([C] * 4, [16] * 4, readout="ignore", **TINY)
    torch.manual_seed(0)
    add = DPTHead([C] * 4, [16] * 4, readout="add", **TINY)
    add.load_state_dict(ignore.state_dict())
    assert not torch.allclose(ignore(feats, (80, 112))["depth"], add(feats, (80, 112))["depth"])


def test_convnext_shapes_bins_and_gradients():
    feats = convnext_features()
    head = DPTHead(feats.channels, feats.strides, output="bins", num_bins=16, **TINY)
    # resize steps are identities for features already at strides 4/8/16/32
    assert all(isinstance(r.resize, torch.nn.Identity) for r in head.reassemble)
    out = head(feats, (80, 112))
    assert out["depth"].shape == (2, 1, 80, 112)
    # Meta's x2 fusion: 80x112 has a 3x4 grid at stride 32 (ceil), so the logits come out at 96x128 and only the
    # depth is resized to the input; to_skip fusion keeps every grid and gives logits at the input size
    assert out["logits"].shape == (2, 16, 96, 128)
    to_skip = DPTHead(feats.channels, feats.strides, output="bins", num_bins=16, fusion_upsample="to_skip", **TINY)
    assert to_skip(feats, (80, 112))["logits"].shape == (2, 16, 80, 112)
    head.loss(out, {"depth": torch.rand(2, 80, 112) * 5 + 0.5})["loss_silog"].backward()
    assert_all_grads(head)


def test_readout_needs_cls():
    with pytest.raises(ValueError, match="readout"):
        DPTHead([16, 24, 32, 48], [4, 8, 16, 32], readout="add")
    head = DPTHead([C] * 4, [16] * 4, readout="project", **TINY)
    feats = vit_features()
    feats.cls = None
    with pytest.raises(ValueError, match="class tokens"):
        head(feats, (80, 112))


def test_crop_to_image_size_inside_padded():
    """Maps cover a padded 80x112 input; an image_size of 75x100 is its top-left corner."""
    feats = vit_features()
    head = DPTHead([C] * 4, [16] * 4, **TINY).eval()
    full = head(feats, (80, 112))["depth"]
    crop = head(feats, (75, 100))["depth"]
    assert crop.shape == (2, 1, 75, 100)
    torch.testing.assert_close(crop, full[..., :75, :100])


def test_defaults():
    head = DPTHead([384] * 4, [16] * 4)
    assert head.features == 64 == default_features(384)
    assert head.post_channels == [48, 96, 192, 384]
    assert default_features(768) == 128 and default_features(1024) == 256
    assert DPTHead([96, 192, 384, 768], [4, 8, 16, 32]).post_channels == [96, 192, 384, 768]
    # Meta's released depthers' rule: [min(C, 2048)] x 4 ([1024] x 4 on ViT-L, [2048] x 4 on ViT-7B)
    assert DPTHead([384] * 4, [16] * 4, features=8, post_channels="meta").post_channels == [384] * 4
    with pytest.raises(ValueError, match="post_channels"):
        DPTHead([384] * 4, [16] * 4, post_channels="full")


@pytest.mark.parametrize("seed", range(4))
def test_relu_regression_starts_alive(seed):
    """At init no pixel may sit in the ReLU's dead zone (depth == min_depth, zero gradient)."""
    torch.manual_seed(seed)
    head = DPTHead([C] * 4, [16] * 4, **TINY)
    d = head(vit_features(seed=seed), (80, 112))["depth"].detach()
    assert bool((d > head.min_depth).all())


def test_sigmoid_activation_range():
    head = DPTHead([C] * 4, [16] * 4, activation="sigmoid", max_depth=7.0, **TINY)
    d = head(vit_features(), (80, 112))["depth"].detach()
    assert float(d.min()) >= 0.0 and float(d.max()) <= 7.0


# --------------------------------------------------------------------------------------------------------- bins
@pytest.mark.parametrize("spacing", ["linear", "log"])
def test_bin_centres_against_numpy(spacing):
    k, lo, hi = 8, 0.001, 10.0
    if spacing == "linear":
        e = np.linspace(lo, hi, k + 1)
        ref = (e[:-1] + e[1:]) / 2
    else:
        e = np.exp(np.linspace(np.log(lo), np.log(hi), k + 1))
        ref = np.sqrt(e[:-1] * e[1:])
    np.testing.assert_allclose(bin_centres(k, lo, hi, spacing).numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("spacing", ["linear", "log"])
def test_one_hot_bins_give_bin_centre(spacing):
    k_bins, lo, hi = 256, 0.001, 10.0
    if spacing == "linear":
        e = np.linspace(lo, hi, k_bins + 1)
        centres = (e[:-1] + e[1:]) / 2
    else:
        e = np.exp(np.linspace(np.log(lo), np.log(hi), k_bins + 1))
        centres = np.sqrt(e[:-1] * e[1:])
    head = DPTHead([C] * 4, [16] * 4, output="bins", bin_spacing=spacing, min_depth=lo, max_depth=hi,
                   bin_placement="midpoints", bin_norm="softmax", **TINY)
    for k in (0, 37, 200, 255):
        # through the reduction directly
        logits = torch.zeros(1, k_bins, 3, 4)
        logits[:, k] = 60.0
        d = head.bins_to_depth(logits)
        assert d.shape == (1, 1, 3, 4)
        np.testing.assert_allclose(d.numpy(), centres[k], rtol=1e-5)
        # and through the whole forward: zero the last conv, put the large logit in its bias
        with torch.no_grad():
            head.head_out.weight.zero_()
            head.head_out.bias.zero_()
            head.head_out.bias[k] = 60.0
        out = head(vit_features(), (80, 112))
        np.testing.assert_allclose(out["depth"].detach().numpy(), centres[k], rtol=1e-5)


@pytest.mark.parametrize("output", ["regression", "bins"])
def test_bf16_autocast_gives_float32_depth(output):
    torch.manual_seed(0)
    head = DPTHead([C] * 4, [16] * 4, output=output, num_bins=16, **TINY)
    feats = vit_features()
    ref = head(feats, (80, 112))["depth"].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats, (80, 112))
        loss = head.loss(out, {"depth": torch.rand(2, 80, 112) * 5 + 0.5})["loss_silog"]
    assert out["depth"].dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(out["depth"].detach(), ref, rtol=0.05, atol=0.05)


def test_bins_mixture_is_expectation():
    head = DPTHead([C] * 4, [16] * 4, output="bins", num_bins=4, min_depth=1.0, max_depth=5.0,
                   bin_placement="midpoints", bin_norm="softmax", **TINY)
    p = np.array([0.1, 0.2, 0.3, 0.4])  # centres 1.5, 2.5, 3.5, 4.5
    logits = torch.tensor(np.log(p), dtype=torch.float32).view(1, 4, 1, 1)
    assert float(head.bins_to_depth(logits)) == pytest.approx(0.1 * 1.5 + 0.2 * 2.5 + 0.3 * 3.5 + 0.4 * 4.5, rel=1e-5)
    # Meta's mapping (the default): bins linspace(1, 5, 4) = 1, 7/3, 11/3, 5, weights relu(x) + 0.1 normalised
    meta = DPTHead([C] * 4, [16] * 4, output="bins", num_bins=4, min_depth=1.0, max_depth=5.0, **TINY)
    x = torch.tensor([-1.0, 0.4, 0.9, 0.0]).view(1, 4, 1, 1)
    w = np.array([0.1, 0.5, 1.0, 0.1])
    ref = float((w / w.sum()) @ np.array([1.0, 7 / 3, 11 / 3, 5.0]))
    assert float(meta.bins_to_depth(x)) == pytest.approx(ref, rel=1e-6)


# ------------------------------------------------------------------------------------------------------- losses
def test_silog_against_numpy_formula():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 9.0, size=(2, 5, 6))
    pred = gt * rng.uniform(0.7, 1.4, size=gt.shape)
    mask = rng.uniform(size=gt.shape) > 0.3
    gt_bad, pred_bad = gt.copy(), pred.copy()
    gt_bad[~mask] = 0.0
    pred_bad[~mask] = -5.0  # garbage where invalid must not matter
    lam, eps = 0.15, 1e-3
    g = np.log(pred[mask] + eps) - np.log(gt[mask] + eps)
    ref = math.sqrt(np.mean((g - g.mean()) ** 2) + lam * g.mean() ** 2)  # Meta: sqrt(Var + lambda Mean^2)
    common = math.sqrt(np.mean(g**2) - (1 - lam) * g.mean() ** 2)  # Eigen/BTS form with 1 - lambda
    assert ref == pytest.approx(common, rel=1e-12)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = SiLogLoss(lam, eps)(t(pred_bad), t(gt_bad), torch.tensor(mask))
    assert float(got) == pytest.approx(ref, rel=1e-10)


def test_head_loss_masks_zero_and_out_of_range():
    head = DPTHead([C] * 4, [16] * 4, min_depth=0.5, max_depth=5.0, silog_unbiased=False, silog_warmup=0, **TINY)
    gt = torch.tensor([[[1.0, 2.0, 0.0], [7.0, 0.2, 4.0]]], dtype=torch.float64)  # 0, 7 (>max), 0.2 (<min) invalid
    pred = torch.tensor([[[1.5, 1.0, 3.0], [0.1, 9.0, 4.0]]], dtype=torch.float64).unsqueeze(1)
    valid = [(1.5, 1.0), (1.0, 2.0), (4.0, 4.0)]
    g = np.array([math.log(p + 1e-3) - math.log(q + 1e-3) for p, q in valid])
    ref = math.sqrt(np.mean((g - g.mean()) ** 2) + 0.15 * g.mean() ** 2)
    assert float(head.loss({"depth": pred}, {"depth": gt})["loss_silog"]) == pytest.approx(ref, rel=1e-10)
    # the defaults (Meta's): the first 100 training calls leave the variance out, then Var with N - 1
    meta = DPTHead([C] * 4, [16] * 4, min_depth=0.5, max_depth=5.0, **TINY)
    first = float(meta.loss({"depth": pred}, {"depth": gt})["loss_silog"])
    assert first == pytest.approx(math.sqrt(0.15) * abs(g.mean()), rel=1e-10)
    meta.criterion.silog.calls = 100
    unbiased = math.sqrt(np.var(g, ddof=1) + 0.15 * g.mean() ** 2)
    assert float(meta.loss({"depth": pred}, {"depth": gt})["loss_silog"]) == pytest.approx(unbiased, rel=1e-10)


def test_gradient_matching_against_brute_force():
    rng = np.random.default_rng(1)
    gt = rng.uniform(1, 5, size=(2, 9, 7))
    pred = rng.uniform(1, 5, size=(2, 9, 7))
    mask = rng.uniform(size=gt.shape) > 0.25
    r = np.log(pred + 1e-3) - np.log(gt + 1e-3)
    total = 0.0
    for s in range(4):
        st = 2**s
        rs, ms = r[:, ::st, ::st], mask[:, ::st, ::st]
        acc = 0.0
        for b in range(rs.shape[0]):
            for i in range(rs.shape[1]):
                for j in range(rs.shape[2]):
                    if j + 1 < rs.shape[2] and ms[b, i, j] and ms[b, i, j + 1]:
                        acc += abs(rs[b, i, j + 1] - rs[b, i, j])
                    if i + 1 < rs.shape[1] and ms[b, i, j] and ms[b, i + 1, j]:
                        acc += abs(rs[b, i + 1, j] - rs[b, i, j])
        total += acc / max(ms.sum(), 1)
    ref = total / 4
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    loss = GradientMatchingLoss(scales=4, eps=1e-3)
    assert float(loss(t(pred), t(np.where(mask, gt, 0.0)), torch.tensor(mask))) == pytest.approx(ref, rel=1e-10)


def test_grad_loss_enabled_and_weighted():
    head = DPTHead([C] * 4, [16] * 4, grad_weight=0.5, **TINY)
    out = head(vit_features(), (80, 112))
    gt = torch.rand(2, 80, 112) * 5 + 0.5
    losses = head.loss(out, {"depth": gt})
    assert set(losses) == {"loss_silog", "loss_grad"}
    mask = torch.ones_like(gt, dtype=torch.bool)
    raw = GradientMatchingLoss()(out["depth"][:, 0], gt, mask)
    assert losses["loss_grad"].item() == pytest.approx(0.5 * raw.item(), rel=1e-5)


@pytest.mark.parametrize("output", ["regression", "bins"])
def test_all_invalid_batch_gives_finite_zero_with_gradients(output):
    head = DPTHead([C] * 4, [16] * 4, output=output, num_bins=8, grad_weight=1.0, **TINY)
    out = head(vit_features(), (80, 112))
    gt = torch.zeros(2, 80, 112)
    gt[0, :5] = 50.0  # beyond max_depth: also invalid
    gt[1, :5] = float("nan")
    losses = head.loss(out, {"depth": gt})
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() == 0.0
    total.backward()
    assert_all_grads(head)


# ------------------------------------------------------------------------------------------------------ overfit
@pytest.mark.parametrize("output", ["regression", "bins"])
def test_overfit_fixed_tiny_batch(output):
    torch.manual_seed(0)
    feats = vit_features(b=2, h=48, w=48, c=32, seed=3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    gt = torch.stack([1.0 + 4.0 * xx, 6.0 - 3.0 * yy])
    gt[0, 16:32, 16:32] = 8.0
    gt[1, :4] = 0.0  # some invalid pixels
    head = DPTHead([32] * 4, [16] * 4, output=output, num_bins=32, **TINY)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        loss = sum(head.loss(head(feats, (48, 48)), {"depth": gt}).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = sum(head.loss(head(feats, (48, 48)), {"depth": gt}).values()).item()
    assert final < 0.3 * first, (first, final)
