"""Mask2Former head: output shapes and prediction, pyramid strides, parameter count, gradients (ignored pixels
included), and a tiny batch it learns."""

import pytest
import torch
import torch.nn.functional as F

from backbones.features import Features
from heads.mask2former import Mask2FormerHead, SimpleFeaturePyramid

from mask2former_inputs import TINY, blocky_masks, one_thread, vit_features  # noqa: F401  (one_thread: autouse)


def convnext_features(b=2, size=(80, 112), channels=(16, 32, 64, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, c, size[0] // s, size[1] // s, generator=g) for c, s in zip(channels, (4, 8, 16, 32))]
    return Features(maps=maps, cls=None, strides=[4, 8, 16, 32], channels=list(channels), patch_size=4, padded_size=size)


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_head_shapes_odd_size(kind):
    size = (80, 112)
    feats = vit_features(h=5, w=7) if kind == "vit" else convnext_features(size=size)
    head = Mask2FormerHead(feats.channels, feats.strides, num_classes=5, **TINY)
    out = head(feats, size)
    assert out["pred_logits"].shape == (2, 6, 6)
    assert out["pred_masks"].shape == (2, 6, 20, 28)
    assert len(out["aux_outputs"]) == TINY["dec_layers"]
    for a in out["aux_outputs"]:
        assert a["pred_logits"].shape == (2, 6, 6) and a["mask_embed"].shape == (2, 6, 32)
        assert a["mask_features"].shape == (2, 32, 20, 28)
    pred = head.predict(out, size)
    assert pred.shape == (2, 5, 80, 112)
    # independent reference: loop over queries
    up = F.interpolate(out["pred_masks"], size=size, mode="bilinear", align_corners=False).sigmoid()
    probs = out["pred_logits"].softmax(-1)
    ref = sum(probs[:, q, :5, None, None] * up[:, q, None] for q in range(6))
    torch.testing.assert_close(pred, ref.detach())


def test_pyramid_strides():
    pyr = SimpleFeaturePyramid([64] * 4, [16] * 4, 32)
    outs = pyr([torch.randn(1, 64, 5, 7) for _ in range(4)])
    assert [tuple(o.shape[-2:]) for o in outs] == [(20, 28), (10, 14), (5, 7), (3, 4)]
    assert all(o.shape[1] == 32 for o in outs)
    single = SimpleFeaturePyramid([64], [16], 32)  # one map feeds every level
    assert [tuple(o.shape[-2:]) for o in single([torch.randn(1, 64, 4, 4)])] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_param_count_scales_with_hidden_not_backbone():
    counts = {c: sum(p.numel() for p in Mask2FormerHead([c] * 4, [16] * 4, 150).parameters()) for c in (384, 1024)}
    print(f"Mask2FormerHead params (hidden 256, 150 classes): ViT-S {counts[384] / 1e6:.2f}M, ViT-L {counts[1024] / 1e6:.2f}M")
    assert counts[384] < 21.6e6
    assert counts[1024] - counts[384] < 1.5e6  # only the input projections grow with the backbone width


def _check_all_grads(head):
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_all_params_get_gradients():
    torch.manual_seed(0)
    feats = vit_features(h=4, w=4)
    head = Mask2FormerHead(feats.channels, feats.strides, num_classes=4, **TINY)
    out = head(feats, (64, 64))
    losses = head.loss(out, {"mask": blocky_masks(2, 64, 64, 4)})
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    sum(losses.values()).backward()
    _check_all_grads(head)
    # the encoder level embedding only enters the deformable-attention *queries*, whose offset / weight
    # projections start at zero (Deformable-DETR init): its first gradient is exactly 0 by design
    zero = [n for n, p in head.named_parameters() if p.grad.abs().max() == 0]
    assert zero in ([], ["pixel_decoder.level_embed"]), zero


def test_all_ignore_batch():
    torch.manual_seed(0)
    feats = vit_features(h=4, w=4)
    head = Mask2FormerHead(feats.channels, feats.strides, num_classes=4, **TINY)
    out = head(feats, (64, 64))
    losses = head.loss(out, {"mask": torch.full((2, 64, 64), 255)})
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_ce"] > 0
    sum(losses.values()).backward()
    _check_all_grads(head)
    # mixed batch: one image fully ignored, one labelled
    head.zero_grad(set_to_none=True)
    mask = blocky_masks(2, 64, 64, 4)
    mask[0] = 255
    losses = head.loss(head(feats, (64, 64)), {"mask": mask})
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    _check_all_grads(head)


def test_overfit_tiny_batch():
    torch.manual_seed(0)
    feats = vit_features(b=2, c=16, h=4, w=4, seed=1)
    target = {"mask": blocky_masks(2, 64, 64, 3, seed=4, block=32)}
    head = Mask2FormerHead(feats.channels, feats.strides, num_classes=3, hidden_dim=32, num_queries=5,
                           dec_layers=2, enc_layers=1, num_heads=4, num_points=256)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    history = []
    for _ in range(60):
        loss = sum(head.loss(head(feats, (64, 64)), target).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.3 * history[0], history
    with torch.no_grad():
        pred = head.predict(head(feats, (64, 64)), (64, 64)).argmax(1)
    assert (pred == target["mask"]).float().mean() > 0.9
