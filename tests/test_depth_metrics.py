"""Depth metrics against hand-worked values, Eigen crop, alignment, the NYUv2 reader and a real-data round trip."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dense_data.io import CorruptFileError
from dense_data.nyu import NYUv2, write_nyu_sample
from tasks.metrics.depth import (
    METRIC_NAMES,
    DepthMetrics,
    align_least_squares,
    eigen_crop_mask,
    image_depth_metrics,
)
from tasks.visualize_depth import TURBO_LUT, colorize_depth, save_depth_panel


def run_metric(pred, gt, **kw):
    m = DepthMetrics(**kw)
    m.update(torch.as_tensor(np.asarray(pred, dtype=np.float64))[None, None], torch.as_tensor(np.asarray(gt))[None])
    return m.compute()


# ----------------------------------------------------------------------------------------------- hand-worked
def test_metrics_3x3_by_hand():
    # valid with max_inclusive: gt in (0.001, 10]: 1, 2, 4, 10; 0, 20 (> max) and 0.0005 (< min) are masked
    gt = [[1.0, 2.0, 0.0], [4.0, 20.0, 0.0005], [0.0, 10.0, 0.0]]
    pred = [[2.0, 2.2, 5.0], [6.0, 1.0, 1.0], [7.0, 8.0, 9.0]]
    # pairs (p, g): (2, 1), (2.2, 2), (6, 4), (8, 10)
    r = run_metric(pred, gt, min_depth=0.001, max_depth=10.0, max_inclusive=True)
    assert set(r) == set(METRIC_NAMES) and all(isinstance(v, float) for v in r.values())
    assert r["abs_rel"] == pytest.approx((1 / 1 + 0.2 / 2 + 2 / 4 + 2 / 10) / 4)  # 0.45
    assert r["abs_rel"] == pytest.approx(0.45)
    assert r["sq_rel"] == pytest.approx((1 / 1 + 0.04 / 2 + 4 / 4 + 4 / 10) / 4)  # 0.605
    assert r["rmse"] == pytest.approx(math.sqrt((1 + 0.04 + 4 + 4) / 4))
    d = [math.log(2), math.log(1.1), math.log(1.5), math.log(0.8)]
    assert r["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in d) / 4))
    assert r["log10"] == pytest.approx((math.log10(2) + math.log10(1.1) + math.log10(1.5) - math.log10(0.8)) / 4)
    mean_d = sum(d) / 4
    assert r["silog"] == pytest.approx(100 * math.sqrt(sum(x * x for x in d) / 4 - mean_d**2))
    # max ratios 2, 1.1, 1.5, 1.25: < 1.25 -> only 1.1; < 1.5625 -> 1.1, 1.5, 1.25; < 1.953125 -> same three
    assert (r["delta1"], r["delta2"], r["delta3"]) == pytest.approx((0.25, 0.75, 0.75))
    # Meta's masking (the default) drops gt >= max: the pair (8, 10) is left out
    meta = run_metric(pred, gt, min_depth=0.001, max_depth=10.0)
    assert meta["abs_rel"] == pytest.approx((1 / 1 + 0.2 / 2 + 2 / 4) / 3)


def test_prediction_clamped_to_range():
    r = run_metric([[50.0, 0.0]], [[5.0, 2.0]], min_depth=0.5, max_depth=10.0)
    # 50 -> 10: |10-5|/5 = 1 ; 0 -> 0.5: |0.5-2|/2 = 0.75
    assert r["abs_rel"] == pytest.approx((1.0 + 0.75) / 2)


def test_mean_over_images_not_pixels_and_empty_images_skipped():
    m = DepthMetrics()
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]], [[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    pred = torch.tensor([[[2.0, 2.0], [2.0, 9.0]], [[3.0, 1.0], [1.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]]])
    m.update(pred[:, None], gt)
    # image 0: (1 + 0 + 0.5) / 3 = 0.5 ; image 1: 0 ; image 2: no valid pixel (skipped)
    assert int(m.count) == 2
    assert m.compute()["abs_rel"] == pytest.approx(0.25)  # a pixel mean would be 1.5 / 4 = 0.375
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(DepthMetrics().compute()["rmse"])


def test_states_sum_like_ddp():
    """Two 'processes' each see half of the images; summed states give the mean over all images."""
    rng = np.random.default_rng(0)
    gt = torch.tensor(rng.uniform(0.5, 9, size=(4, 6, 5)))
    pred = gt * torch.tensor(rng.uniform(0.8, 1.3, size=gt.shape))
    whole, a, b = DepthMetrics(), DepthMetrics(), DepthMetrics()
    whole.update(pred, gt)
    a.update(pred[:1], gt[:1])
    b.update(pred[1:], gt[1:])
    for name in a._defaults:  # what dist_reduce_fx="sum" does across processes
        setattr(a, name, getattr(a, name) + getattr(b, name))
    ra, rw = a.compute(), whole.compute()
    for k in METRIC_NAMES:
        assert ra[k] == pytest.approx(rw[k])
    assert all(a._reductions[n] is not None for n in a._defaults)


def test_prediction_resized_to_target():
    m = DepthMetrics()
    m.update(torch.full((1, 1, 4, 4), 2.0), torch.full((1, 8, 8), 4.0))
    assert m.compute()["abs_rel"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ Eigen crop
def test_eigen_crop_region_480x640():
    mask = eigen_crop_mask(480, 640)
    assert int(mask.sum()) == 426 * 560
    assert mask[45, 41] and mask[470, 600]
    assert not mask[44, 41] and not mask[45, 40] and not mask[471, 600] and not mask[470, 601]
    # scaled: exact at 960x1280 (rows 90:942, cols 82:1202); 240x320 rounds half up (22.5 -> 23, 235.5 -> 236, ...)
    big = eigen_crop_mask(960, 1280)
    ref = torch.zeros(960, 1280, dtype=torch.bool)
    ref[90:942, 82:1202] = True
    assert torch.equal(big, ref)
    small = eigen_crop_mask(240, 320)
    ref = torch.zeros(240, 320, dtype=torch.bool)
    ref[22:235, 20:300] = True
    assert torch.equal(small, ref)
    # rounding half up instead: 22.5 -> 23, 235.5 -> 236, 20.5 -> 21, 300.5 -> 301
    ref = torch.zeros(240, 320, dtype=torch.bool)
    ref[23:236, 21:301] = True
    assert torch.equal(eigen_crop_mask(240, 320, rounding="round"), ref)


def test_eigen_crop_metric():
    gt = np.full((480, 640), 2.0)
    pred = np.full((480, 640), 4.0)  # abs_rel 1 outside the crop
    pred[45:471, 41:601] = 2.0  # exact inside
    assert run_metric(pred, gt, eigen_crop=True)["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    outside = 1 - 426 * 560 / (480 * 640)  # 0.2234375
    assert run_metric(pred, gt, eigen_crop=False)["abs_rel"] == pytest.approx(outside)


# ------------------------------------------------------------------------------------------------- alignment
def test_median_alignment_by_hand():
    gt = [[1.0, 2.0], [3.0, 4.0]]
    pred = [[2.0, 4.0], [6.0, 10.0]]
    # median(gt) = 2.5, median(pred) = 5 -> scale 0.5 -> pred 1, 2, 3, 5 -> abs_rel = 0.25 / 4
    assert run_metric(pred, gt, align="median")["abs_rel"] == pytest.approx(0.0625)
    assert run_metric(np.asarray(gt) * 3.0, gt, align="median")["abs_rel"] == pytest.approx(0.0, abs=1e-12)


def test_least_squares_alignment_scale_and_shift():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1.0, 9.0, size=(8, 8))
    gt[rng.uniform(size=gt.shape) < 0.3] = 0.0
    pred = gt * 2 + 0.5
    pred[gt == 0] = 100.0  # garbage on invalid pixels must not enter the fit
    r = run_metric(pred, gt, align="least_squares")
    assert r["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    assert r["rmse"] == pytest.approx(0.0, abs=1e-9) and r["delta1"] == 1.0
    assert run_metric(pred, gt, align="none")["abs_rel"] > 0.5
    assert run_metric(pred, gt, align="median")["abs_rel"] > 1e-3  # a shift is not a scale
    # the fitted (s, t) is numpy's least-squares solution
    mask = torch.tensor(gt > 0)
    aligned = align_least_squares(torch.tensor(pred), torch.tensor(gt), mask)
    np.testing.assert_allclose(aligned.numpy()[gt > 0], gt[gt > 0], rtol=1e-10)


def test_image_metrics_none_without_valid_pixel_and_bad_align():
    assert image_depth_metrics(torch.ones(2, 2), torch.zeros(2, 2)) is None
    with pytest.raises(ValueError):
        DepthMetrics(align="mean")


# ------------------------------------------------------------------------------------------------ colour map
def test_colorize_depth():
    depth = np.array([[1.0, 3.0, 5.0], [0.0, np.nan, 9.0]])
    rgb = colorize_depth(depth, vmin=1.0, vmax=5.0)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == TURBO_LUT[0]).all() and (rgb[0, 2] == TURBO_LUT[-1]).all()
    assert (rgb[1, 2] == TURBO_LUT[-1]).all()  # clipped above vmax
    assert (rgb[1, 0] == 0).all() and (rgb[1, 1] == 0).all()  # invalid -> black
    assert (rgb[0, 1] == TURBO_LUT[128]).all()  # middle of the range
    # near is blue-ish, far is red-ish
    assert TURBO_LUT[0, 2] > TURBO_LUT[0, 0] and TURBO_LUT[-1, 0] > TURBO_LUT[-1, 2]


# ------------------------------------------------------------------------------------------------ NYU reader
def test_nyu_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.5, size=(6, 7)).astype(np.float32)
    depth[0, 0] = 0.0
    depth[1, 1] = np.nan
    write_nyu_sample(tmp_path, "/scene_a/rgb_0.png", "scene_a/depth_0.png", image, depth, split="test", focal=518.8579)
    png = Image.open(tmp_path / "scene_a/depth_0.png")
    assert png.mode == "I;16" and np.asarray(png).dtype == np.uint16
    assert int(np.asarray(png)[2, 3]) == int(round(float(depth[2, 3]) * 1000))

    ds = NYUv2(tmp_path, split="test")
    assert len(ds) == 1
    s = ds[0]
    assert s["image"].dtype == np.uint8 and np.array_equal(s["image"], image)
    assert s["depth"].dtype == np.float32 and s["depth"].shape == (6, 7)
    assert s["depth"][0, 0] == 0 and s["depth"][1, 1] == 0
    ok = np.isfinite(depth) & (depth > 0)
    np.testing.assert_allclose(s["depth"][ok], depth[ok], atol=0.5e-3 + 1e-6)
    assert s["meta"]["focal"] == pytest.approx(518.8579) and s["meta"]["orig_size"] == (6, 7)
    assert s["meta"]["id"] == "scene_a/rgb_0"

    # KITTI-style sparse depth: uint16 / 256
    write_nyu_sample(tmp_path / "kitti", "a/img.png", "a/gt.png", image, depth * 8, depth_scale=256.0, split="train")
    k = NYUv2(tmp_path / "kitti", split="train", depth_scale=256.0)[0]["depth"]
    np.testing.assert_allclose(k[ok], depth[ok] * 8, atol=0.5 / 256 + 1e-5)

    with pytest.raises(FileNotFoundError, match="nyu_train.txt"):
        NYUv2(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="nyu_train.txt"):
        NYUv2(tmp_path, split="train")  # root exists, split file does not
    lines = "scene_b/rgb.jpg scene_b/depth.png\nscene_a/rgb_0.png scene_a/depth_0.png\n"
    (tmp_path / "nyu_train.txt").write_text(lines)
    bad = NYUv2(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="scene_b/rgb.jpg"):
        bad[0]
    (tmp_path / "scene_a" / "depth_0.png").write_bytes(b"not a png")
    with pytest.raises(CorruptFileError, match="depth_0.png"):
        bad[1]
    (tmp_path / "scene_a" / "rgb_0.png").write_bytes(b"not a png")
    with pytest.raises(CorruptFileError, match="rgb_0.png"):
        bad[1]
    Image.fromarray(image).save(tmp_path / "scene_a" / "depth_0.png")  # an RGB file is not a depth map
    Image.fromarray(image).save(tmp_path / "scene_a" / "rgb_0.png")
    with pytest.raises(CorruptFileError, match="depth_0.png"):
        bad[1]


# ------------------------------------------------------------------------------------------------- real data
def test_real_stereo_motorcycle(tmp_path):
    import skimage.data

    left, _, disparity = skimage.data.stereo_motorcycle()
    focal, baseline = 1000.0, 0.1  # px, m -> depth 100 / disparity, 1.7 to 14 m
    ok = np.isfinite(disparity) & (disparity > 0)
    depth = np.where(ok, focal * baseline / np.where(ok, disparity, 1.0), 0.0)
    depth[depth > 10.0] = 0.0  # beyond the NYU range: invalid
    depth = depth.astype(np.float32)
    rgb, dep = "motorcycle/rgb_00000.jpg", "motorcycle/sync_depth_00000.png"
    write_nyu_sample(tmp_path, rgb, dep, left, depth, split="test", focal=focal)

    sample = NYUv2(tmp_path, split="test")[0]
    gt = sample["depth"]
    assert sample["image"].shape == left.shape and gt.shape == depth.shape
    valid = gt > 0
    assert np.array_equal(valid, depth > 0) and valid.mean() > 0.5
    np.testing.assert_allclose(gt[valid], depth[valid], atol=0.5e-3 + 1e-6)

    pred = gt * 1.1
    pred[~valid] = 3.0
    r = run_metric(pred, gt, min_depth=1e-3, max_depth=10.0, max_inclusive=True)
    # independent numpy reference: clamp to [1e-3, 10], mean over valid pixels (gt <= 10: max_inclusive)
    g = gt[valid].astype(np.float64)
    p = np.clip(g * 1.1, 1e-3, 10.0)
    assert r["abs_rel"] == pytest.approx(np.mean(np.abs(p - g) / g), rel=1e-6)
    assert r["abs_rel"] == pytest.approx(0.1, abs=0.01)
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean((p - g) ** 2)), rel=1e-6)
    assert r["delta1"] == 1.0

    out = save_depth_panel(tmp_path / "vis" / "motorcycle.png", sample["image"], gt, pred)
    assert out.is_file()
    with Image.open(out) as im:
        assert im.size == (3 * left.shape[1], left.shape[0]) and im.mode == "RGB"
        arr = np.asarray(im)
    assert np.array_equal(arr[:, : left.shape[1]], sample["image"])
    assert (arr[:, left.shape[1] :][~np.concatenate([valid, np.ones_like(valid)], axis=1)] == 0).all()
