"""Mask2Former head: deformable attention, matcher/loss parity with transformers, shapes, grads, DDP."""

import math
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from backbones.features import Features
from heads.mask2former import (
    HungarianMatcher,
    Mask2FormerCriterion,
    Mask2FormerHead,
    SimpleFeaturePyramid,
    semantic_to_targets,
)
from heads.mask2former.mask_logits import DenseMaskLogits, FactoredMaskLogits, select_matched
from heads.mask2former.matcher import sample_matched_targets, sample_targets
from heads.mask2former.pixel_decoder import sine_position_embedding
from heads.ops import MSDeformAttn, average_over_processes, ms_deform_attn_core
from heads.ops.ms_deform_attn import _pair_dots, _row_dots, ms_deform_attn_grid_sample

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and spin badly on a shared CPU). Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(hidden_dim=32, num_queries=6, dec_layers=2, enc_layers=1, num_heads=4, num_points=256)


def vit_features(b=2, c=64, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, c, h, w, generator=g) for _ in range(4)]
    return Features(maps=maps, cls=None, strides=[16] * 4, channels=[c] * 4, patch_size=16, padded_size=(16 * h, 16 * w))


def convnext_features(b=2, size=(80, 112), channels=(16, 32, 64, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, c, size[0] // s, size[1] // s, generator=g) for c, s in zip(channels, (4, 8, 16, 32))]
    return Features(maps=maps, cls=None, strides=[4, 8, 16, 32], channels=list(channels), patch_size=4, padded_size=size)


def blocky_masks(b, h, w, num_classes, seed=0, block=16):
    """Piecewise-constant label maps (B, H, W)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (b, 1, math.ceil(h / block), math.ceil(w / block)), generator=g)
    return F.interpolate(coarse.float(), scale_factor=block, mode="nearest")[:, 0, :h, :w].long()


# ---------------------------------------------------------------- deformable attention


def naive_bilinear(img, x, y):
    """img (C, H, W); x, y normalised [0, 1] (align_corners=False), zero outside."""
    c, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(c, dtype=img.dtype)
    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        wgt = (1 - abs(px - xx)) * (1 - abs(py - yy))
        if 0 <= xx < w and 0 <= yy < h:
            out += wgt * img[:, yy, xx]
    return out


def test_ms_deform_attn_single_point_equals_hand_bilinear():
    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dim=8, num_heads=2, num_levels=1, num_points=1)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        attn.attention_weights.weight.normal_()  # irrelevant: softmax over a single point is 1
    h, w = 3, 5
    value_in = torch.randn(1, h * w, 8)
    query = torch.randn(1, 2, 8)
    ref = torch.tensor([[[0.37, 0.61]], [[0.05, 0.95]]]).view(1, 2, 1, 2)
    out = attn(query, ref, value_in, [(h, w)])
    with torch.no_grad():
        v = attn.value_proj(value_in)[0].T.reshape(8, h, w)
        expected = torch.stack([attn.output_proj(naive_bilinear(v, *ref[0, q, 0].tolist())) for q in range(2)])
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_ms_deform_attn_core_matches_naive_loop_and_transformers():
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (2, 3)]
    b, m, d, lq, p = 2, 2, 3, 3, 2
    value = torch.randn(b, sum(h * w for h, w in shapes), m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(b, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.3 - 0.15  # some outside
    wts = torch.rand(b, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    out = ms_deform_attn_core(value, shapes, loc, wts)
    assert out.shape == (b, lq, m * d)
    starts = [0, shapes[0][0] * shapes[0][1]]
    expected = torch.zeros(b, lq, m, d, dtype=torch.float64)
    for bi in range(b):
        for q in range(lq):
            for mi in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    img = value[bi, starts[lvl] : starts[lvl] + h * w, mi].T.reshape(d, h, w)
                    for pi in range(p):
                        x, y = loc[bi, q, mi, lvl, pi].tolist()
                        expected[bi, q, mi] += wts[bi, q, mi, lvl, pi] * naive_bilinear(img, x, y)
    torch.testing.assert_close(out, expected.view(b, lq, m * d))
    torch.testing.assert_close(out, multi_scale_deformable_attention(value, shapes, loc, wts))


def test_ms_deform_attn_gather_equals_grid_sample_with_gradients():
    """The gather-sum op equals the per-level grid_sample op: values and the gradients of value, locations, weights,
    with points inside, just outside, far outside (one corner in, or none); on a pixel centre (a kink of bilinear
    interpolation, where the location gradient depends on the last bit of rounding) the values."""
    g = torch.Generator().manual_seed(2)
    shapes = [(5, 7), (3, 4), (2, 2)]
    b, m, d, lq, p = 2, 3, 4, 6, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), m, d, generator=g, requires_grad=True)
    loc = torch.rand(b, lq, m, len(shapes), p, 2, generator=g) * 1.6 - 0.3
    loc[0, 0, 0, :, 0] = torch.tensor([-3.0, 5.0])  # far outside: reads nothing
    loc[1, 2, 1, 1, 1] = torch.tensor([-0.1, 1.05])  # one corner inside
    loc.requires_grad_()
    wts = torch.rand(b, lq, m, len(shapes), p, generator=g).requires_grad_()
    grad = torch.randn(b, lq, m * d, generator=g)
    results = []
    for fn in (ms_deform_attn_core, ms_deform_attn_grid_sample):
        out = fn(value, shapes, loc, wts)
        results.append((out, *torch.autograd.grad(out, (value, loc, wts), grad)))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0
    with torch.no_grad():
        loc[0, 1, 0, 0, 0] = torch.tensor([0.5 / 7, 2.5 / 5])  # a pixel centre
        loc[0, 1, 0, 1, 0] = torch.tensor([0.0, 1.0])  # the map's corner
        torch.testing.assert_close(ms_deform_attn_core(value, shapes, loc, wts),
                                   ms_deform_attn_grid_sample(value, shapes, loc, wts), atol=1e-5, rtol=1e-5)


def test_ms_deform_attn_weight_gradient_accelerator_path_equals_cpu_path():
    """The weight gradient's accelerator kernel (``_pair_dots``, only taken off the CPU) gives ``_row_dots``'s pair
    dot products; run here on the CPU, where both exist, with int32 corner rows as the gather-sum passes them."""
    g = torch.Generator().manual_seed(3)
    table, vectors = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    rows = torch.randint(0, 50, (30, 16), generator=g, dtype=torch.int32)
    torch.testing.assert_close(_pair_dots(table, rows, vectors), _row_dots(table, rows, vectors))


def test_ms_deform_attn_box_reference_and_grad():
    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dim=8, num_heads=2, num_levels=2, num_points=3)
    shapes = [(4, 4), (2, 2)]
    value_in = torch.randn(2, 20, 8, requires_grad=True)
    query = torch.randn(2, 5, 8)
    centres = torch.rand(2, 5, 2)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
    boxes = torch.cat([centres, torch.full((2, 5, 2), 0.3)], -1)
    torch.testing.assert_close(attn(query, boxes, value_in, shapes), attn(query, centres, value_in, shapes))
    attn.reset_parameters()
    out = attn(query, centres[:, :, None].expand(-1, -1, 2, -1), value_in, shapes)
    out.sum().backward()
    assert all(p.grad is not None for p in attn.parameters()) and value_in.grad is not None


# ---------------------------------------------------------------- parity with transformers


def _random_outputs(b=2, q=7, k=4, hw=(16, 16), layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = [
        {"pred_logits": torch.randn(b, q, k + 1, generator=g) * 2, "pred_masks": torch.randn(b, q, *hw, generator=g) * 3}
        for _ in range(layers)
    ]
    for o in outs:
        for t in o.values():
            t.requires_grad_(True)
    final = dict(outs[-1])
    final["aux_outputs"] = outs[:-1]
    return final


def test_matcher_matches_transformers():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerHungarianMatcher

    out = _random_outputs()
    targets = semantic_to_targets(blocky_masks(2, 64, 64, 4, seed=3), num_classes=4)
    assert all(len(t["labels"]) >= 2 for t in targets)
    ours_m = HungarianMatcher(2.0, 5.0, 5.0, num_points=500)
    ref_m = Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=500)
    for layer in [out] + out["aux_outputs"]:
        with torch.random.fork_rng():
            torch.manual_seed(11)
            ours = ours_m(layer["pred_logits"], layer["pred_masks"], targets)
            torch.manual_seed(11)
            ref = ref_m(
                masks_queries_logits=layer["pred_masks"],
                class_queries_logits=layer["pred_logits"],
                mask_labels=[t["masks"] for t in targets],
                class_labels=[t["labels"] for t in targets],
            )
        for (i, j), (ri, rj) in zip(ours, ref):
            assert torch.equal(i, ri) and torch.equal(j, rj)


def test_loss_terms_match_transformers():
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    k, points = 4, 300
    out = _random_outputs(k=k)
    targets = semantic_to_targets(blocky_masks(2, 64, 64, k, seed=5), num_classes=k)
    crit = Mask2FormerCriterion(k, num_points=points)
    cfg = Mask2FormerConfig(
        num_labels=k, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
        train_num_points=points, oversample_ratio=3.0, importance_sample_ratio=0.75,
    )
    ref_loss = Mask2FormerLoss(cfg, weight_dict={})
    with torch.random.fork_rng():
        torch.manual_seed(7)
        ours = crit.layer_terms(out, targets)
        torch.manual_seed(7)
        ref = ref_loss(
            masks_queries_logits=out["pred_masks"],
            class_queries_logits=out["pred_logits"],
            mask_labels=[t["masks"] for t in targets],
            class_labels=[t["labels"] for t in targets],
            auxiliary_predictions=[
                {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]} for a in out["aux_outputs"]
            ],
        )
        torch.manual_seed(7)
        weighted = crit(out, targets)
    names = {"ce": "loss_cross_entropy", "mask": "loss_mask", "dice": "loss_dice"}
    for layer, terms in enumerate(ours):
        suffix = "" if layer == 0 else f"_{layer - 1}"
        for ours_key, ref_key in names.items():
            torch.testing.assert_close(terms[ours_key], ref[ref_key + suffix], rtol=1e-5, atol=1e-6)
    ref_total = sum(w * sum(v for key, v in ref.items() if key.startswith(names[n])) for n, w in crit.weights.items())
    ours_total = sum(weighted.values())
    torch.testing.assert_close(ours_total, ref_total, rtol=1e-5, atol=1e-5)
    # gradients w.r.t. the predictions agree too
    leaves = [out["pred_logits"], out["pred_masks"]]
    g_ours = torch.autograd.grad(ours_total, leaves, retain_graph=True)
    g_ref = torch.autograd.grad(ref_total, leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- mask logits read where needed


def _dense_layers(out):
    """The decoder's prediction dicts with full mask logits ``(B, Q, H, W)`` instead of their factors."""
    layers = [out] + out["aux_outputs"]
    dense = [{"pred_logits": o["pred_logits"],
              "pred_masks": torch.einsum("bqc,bchw->bqhw", o["mask_embed"], o["mask_features"])} for o in layers]
    return dict(dense[0], aux_outputs=dense[1:])


def test_factored_mask_logits_read_the_dense_ones():
    g = torch.Generator().manual_seed(0)
    embed, features = torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, 11, 13, generator=g)
    dense = DenseMaskLogits(torch.einsum("bqc,bchw->bqhw", embed, features))
    factored = FactoredMaskLogits(embed, features)
    coords = torch.cat([torch.rand(50, 2, generator=g), torch.tensor([[0.0, 0.0], [0.999, 0.5], [0.02, 0.98]])])
    for b in range(2):
        torch.testing.assert_close(factored.at_points(b, coords), dense.at_points(b, coords), rtol=1e-5, atol=1e-5)
    queries = [[torch.tensor([3, 0]), torch.tensor([4])], [torch.tensor([], dtype=torch.long), torch.tensor([1, 2])]]
    other = FactoredMaskLogits(embed.flip(1), features)  # a second layer on the same features: read in one product
    ref = [dense.select(queries[0]), DenseMaskLogits(dense.masks.flip(1)).select(queries[1])]
    for got, want in zip(select_matched([factored, other], queries), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_matched_targets_read_in_place_equal_gathered_masks():
    mask = blocky_masks(3, 40, 48, 5, seed=6, block=8)
    mask[1, :7] = 255  # one image with ignored pixels, one without, one with nothing labelled
    mask[2] = 255
    targets = semantic_to_targets(mask, 5)
    n0, n1 = len(targets[0]["labels"]), len(targets[1]["labels"])
    # image 0: every target matched (read in place); image 1: two targets left unmatched (gathered)
    indices = [(torch.arange(n0), torch.randperm(n0)), (torch.arange(n1 - 2), torch.randperm(n1)[: n1 - 2]),
               (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))]
    coords = torch.rand(n0 + n1 - 2, 37, 2)
    labels, weights = sample_matched_targets(targets, indices, coords)
    masks = torch.cat([t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)])
    valid = torch.cat([(t["valid"] if t["valid"] is not None else torch.ones(40, 48))[None].expand(len(tgt), -1, -1)
                       for t, (_, tgt) in zip(targets, indices)])
    ref_labels, ref_weights = sample_targets(masks, valid, coords)
    torch.testing.assert_close(labels, ref_labels)
    torch.testing.assert_close(weights, ref_weights)
    assert sample_matched_targets(targets[:1], indices[:1], coords[:n0])[1] is None


@pytest.mark.parametrize("ignore", [False, True])
def test_criterion_on_factored_masks_equals_dense_masks(ignore):
    """Losses and gradients from the decoder's mask embeddings equal those from full (B, Q, H, W) mask logits."""
    feats = vit_features(h=4, w=5, seed=2)
    torch.manual_seed(0)
    head = Mask2FormerHead(feats.channels, feats.strides, num_classes=4, **TINY)
    mask = blocky_masks(2, 64, 80, 4, seed=1)
    if ignore:
        mask[0, :20] = 255
        mask[1] = 255  # an image with no target: nothing matched there
    targets = semantic_to_targets(mask, 4)
    results = []
    for dense in (False, True):
        head.zero_grad(set_to_none=True)
        out = head(feats, (64, 80))
        with torch.random.fork_rng():
            torch.manual_seed(3)
            terms = head.criterion.layer_terms(_dense_layers(out) if dense else out, targets)
        sum(sum(t.values()) for t in terms).backward()
        results.append((terms, {n: p.grad.clone() for n, p in head.named_parameters()}))
    (factored, g_factored), (dense, g_dense) = results
    for a, b in zip(factored, dense):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max() for g in g_dense.values())
    for name in g_dense:
        torch.testing.assert_close(g_factored[name], g_dense[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_decoder_attention_masks_equal_resized_full_masks():
    """The decoder's attention masks (mask embeddings x features resized to each level) give the same queries as
    masks from full-resolution logits resized per layer (the reference algorithm, written out here)."""
    feats = vit_features(h=6, w=5, seed=4)
    torch.manual_seed(1)
    head = Mask2FormerHead(feats.channels, feats.strides, num_classes=3, **dict(TINY, dec_layers=4)).eval()
    dec = head.transformer_decoder
    with torch.no_grad():
        mask_features, multi_scale = head.pixel_decoder(head.neck_levels(feats))
        out = dec(multi_scale, mask_features)
        b = mask_features.shape[0]
        memories, positions = [], []
        for lvl, x in enumerate(multi_scale):
            positions.append(sine_position_embedding(b, *x.shape[-2:], dec.hidden_dim).flatten(2).transpose(1, 2))
            memories.append(x.flatten(2).transpose(1, 2) + dec.level_embed.weight[lvl])
        queries, query_pos = (e.weight[None].expand(b, -1, -1) for e in (dec.query_feat, dec.query_embed))
        ref_logits = []
        for i in range(dec.num_layers + 1):
            x = dec.decoder_norm(queries)
            ref_logits.append(dec.class_embed(x))
            if i == dec.num_layers:
                break
            masks = torch.einsum("bqc,bchw->bqhw", dec.mask_embed(x), mask_features)
            lvl = i % dec.num_feature_levels
            small = F.interpolate(masks, size=multi_scale[lvl].shape[-2:], mode="bilinear", align_corners=False)
            blocked = small.flatten(2).sigmoid() < 0.5
            blocked = (blocked & ~blocked.all(-1, keepdim=True)).repeat_interleave(dec.num_heads, 0)
            queries = dec.cross_attention_layers[i](queries, memories[lvl], blocked, positions[lvl], query_pos)
            queries = dec.ffn_layers[i](dec.self_attention_layers[i](queries, query_pos))
        ref_masks = torch.einsum("bqc,bchw->bqhw", dec.mask_embed(dec.decoder_norm(queries)), mask_features)
    for a, ref in zip(out["aux_outputs"] + [out], ref_logits):
        torch.testing.assert_close(a["pred_logits"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred_masks"], ref_masks, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ignore handling


def test_ignored_pixels_do_not_count():
    k = 3
    out = _random_outputs(b=1, q=5, k=k, hw=(16, 16), layers=1)
    out.pop("aux_outputs")
    labels = blocky_masks(1, 64, 64, k, seed=2)
    ignored = labels.clone()
    ignored[:, :32] = 255  # top half ignored
    crit = Mask2FormerCriterion(k, num_points=400, importance_sample_ratio=0.0)  # uniform points

    def losses(masks, target):
        o = {"pred_logits": out["pred_logits"], "pred_masks": masks}
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return crit(o, semantic_to_targets(target, k))

    changed = out["pred_masks"].detach().clone()
    changed[:, :, :6] = torch.randn_like(changed[:, :, :6]) * 10  # rows far inside the ignored half
    base, moved = losses(out["pred_masks"], ignored), losses(changed, ignored)
    for key in base:
        torch.testing.assert_close(base[key], moved[key])
    # the same change matters when the top half is labelled (the test can fail)
    assert not torch.allclose(losses(out["pred_masks"], labels)["loss_mask"], losses(changed, labels)["loss_mask"])


def test_semantic_to_targets():
    m = torch.tensor([[[0, 0, 255], [2, 2, 255]]])
    (t,) = semantic_to_targets(m, num_classes=3)
    assert t["labels"].tolist() == [0, 2]
    assert t["masks"].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 0]]]
    assert t["valid"].tolist() == [[1, 1, 0], [1, 1, 0]]
    assert semantic_to_targets(torch.zeros(1, 2, 2, dtype=torch.long), 3)[0]["valid"] is None
    with pytest.raises(ValueError):
        semantic_to_targets(torch.full((1, 2, 2), 3), 3)


# ---------------------------------------------------------------- head shapes, grads, prediction


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


# ---------------------------------------------------------------- distributed num_masks


def test_average_num_masks_single_process():
    assert average_over_processes(3).item() == 3.0
    assert average_over_processes(0).item() == 1.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        local = 3 if rank == 0 else 1
        n = average_over_processes(local, "cpu").item()
        # a target with `local` classes; the mask terms are divided by the averaged count (2), not the local one
        mask = torch.zeros(1, 32, 32, dtype=torch.long)
        for c in range(local):
            mask[:, :, c * 8 :] = c
        targets = semantic_to_targets(mask, num_classes=4)
        out = _random_outputs(b=1, q=5, k=4, layers=2, hw=(8, 8), seed=rank)
        crit = Mask2FormerCriterion(4, num_points=64)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            dist_losses = crit(out, targets)
            torch.manual_seed(0)
            local_losses = crit(out, targets, num_masks=float(local))
        ratio = (dist_losses["loss_mask"] / local_losses["loss_mask"]).item()
        ratio_dice = (dist_losses["loss_dice"] / local_losses["loss_dice"]).item()
        same_ce = torch.allclose(dist_losses["loss_ce"], local_losses["loss_ce"])
        torch.save({"n": n, "ratio": ratio, "ratio_dice": ratio_dice, "same_ce": same_ce}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_num_masks_averaged_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["n"] == 2.0 and r1["n"] == 2.0
    assert r0["ratio"] == pytest.approx(3 / 2, rel=1e-5) and r0["ratio_dice"] == pytest.approx(3 / 2, rel=1e-5)
    assert r1["ratio"] == pytest.approx(1 / 2, rel=1e-5) and r1["ratio_dice"] == pytest.approx(1 / 2, rel=1e-5)
    assert r0["same_ce"] and r1["same_ce"]
