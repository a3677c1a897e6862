"""Mask2Former's fast paths against their references: deformable attention's gather-sum (hand-worked bilinear
interpolation, a naive loop, transformers, the grid_sample path), and mask logits read where needed (factored
against dense logits, matched targets read in place, the decoder's attention masks)."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from heads.mask2former import Mask2FormerHead, semantic_to_targets
from heads.mask2former.mask_logits import DenseMaskLogits, FactoredMaskLogits, select_matched
from heads.mask2former.matcher import sample_matched_targets, sample_targets
from heads.mask2former.pixel_decoder import sine_position_embedding
from heads.ops import MSDeformAttn, ms_deform_attn_core, ms_deform_attn_native, native
from heads.ops.ms_deform_attn import _pair_dots, _row_dots, ms_deform_attn_grid_sample

from mask2former_inputs import TINY, blocky_masks, one_thread, vit_features  # noqa: F401  (one_thread: autouse)


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


@pytest.fixture(params=["compiled", "torch"])
def deform_way(request):
    """float32 CPU deformable attention in the compiled kernel, or in PyTorch (as where no compiler is found)."""
    if request.param == "torch":
        with native.switched_off():
            yield request.param
    else:
        assert ms_deform_attn_native.kernels() is not None, "the kernel must build where the tests run"
        yield request.param


def _gather_against_grid_sample(shapes, b, m, d, lq, p, seed=2):
    """Values and the gradients of value, locations and weights of ``ms_deform_attn_core`` and the grid_sample op,
    with points inside, just outside, far outside (one corner in, or none)."""
    g = torch.Generator().manual_seed(seed)
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
        loc[0, 1, 0, 0, 0] = torch.tensor([0.5 / shapes[0][1], 2.5 / shapes[0][0]])  # a pixel centre
        loc[0, 1, 0, 1, 0] = torch.tensor([0.0, 1.0])  # the map's corner
        loc[1, 0, 2, 0, 1] = torch.tensor([float("nan"), 0.5])  # NaN reads nothing in the kernel (no crash)
        ours, reference = (fn(value, shapes, loc, wts) for fn in (ms_deform_attn_core, ms_deform_attn_grid_sample))
        keep = torch.ones(b, lq, m, d, dtype=torch.bool)
        keep[1, 0, 2] = False  # the NaN sample's output: grid_sample gives NaN there
        torch.testing.assert_close(ours.view(b, lq, m, d)[keep], reference.view(b, lq, m, d)[keep], atol=1e-5,
                                   rtol=1e-5)
    return results


def test_ms_deform_attn_gather_equals_grid_sample_with_gradients(deform_way):
    """Both ways of ``ms_deform_attn_core`` against the grid_sample op; on a pixel centre (a kink of bilinear
    interpolation, where the location gradient depends on the last bit of rounding) the values only."""
    _gather_against_grid_sample([(5, 7), (3, 4), (2, 2)], b=2, m=3, d=4, lq=6, p=3)
    _gather_against_grid_sample([(6, 9), (3, 7)], b=2, m=3, d=37, lq=5, p=2, seed=3)  # 37 channels: 2 vectors + 5


def test_ms_deform_attn_takes_the_compiled_kernel_for_float32_on_cpu(monkeypatch):
    calls = []
    original = ms_deform_attn_native.CompiledMSDeformAttn.apply
    monkeypatch.setattr(ms_deform_attn_native.CompiledMSDeformAttn, "apply",
                        lambda *a: calls.append(a[0].dtype) or original(*a))
    shapes = [(3, 4)]
    for dtype in (torch.float32, torch.float64):
        value = torch.randn(1, 12, 2, 4, dtype=dtype)
        ms_deform_attn_core(value, shapes, torch.rand(1, 3, 2, 1, 2, 2, dtype=dtype), torch.rand(1, 3, 2, 1, 2,
                                                                                                   dtype=dtype))
    assert calls == [torch.float32]
    with native.switched_off():
        ms_deform_attn_core(torch.randn(1, 12, 2, 4), shapes, torch.rand(1, 3, 2, 1, 2, 2), torch.rand(1, 3, 2, 1, 2))
    assert calls == [torch.float32]


@pytest.mark.parametrize("flags", [(), ("-mavx2", "-mfma")], ids=["baseline", "avx2"])
def test_each_version_of_the_deformable_attention_kernel_gives_the_same_numbers(flags, monkeypatch):
    if flags and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    kernels = ms_deform_attn_native.kernels(("-DNATIVE_ONE_VERSION", *flags))
    assert kernels is not None
    monkeypatch.setattr(ms_deform_attn_native, "kernels", lambda *a: kernels)
    _gather_against_grid_sample([(6, 9), (3, 7)], b=2, m=3, d=37, lq=5, p=2, seed=3)


def test_ms_deform_attn_kernel_splits_images_and_heads_between_threads():
    g = torch.Generator().manual_seed(4)
    shapes = [(8, 8), (4, 4)]
    value = torch.randn(3, 80, 4, 16, generator=g, requires_grad=True)
    loc = torch.rand(3, 20, 4, 2, 3, 2, generator=g, requires_grad=True)
    wts = torch.rand(3, 20, 4, 2, 3, generator=g, requires_grad=True)
    results = []
    for count in (1, 2, 5):
        torch.set_num_threads(count)  # the autouse fixture restores it
        out = ms_deform_attn_core(value, shapes, loc, wts)
        results.append((out, *torch.autograd.grad(out.square().sum(), (value, loc, wts))))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b)


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
