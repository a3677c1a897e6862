"""The depth task: ``train.py task=demo_dpt`` / ``task=nyu_dpt`` end to end, validation == DepthMetrics on the
task's dense output (resized eval images, flip TTA), and the mean-depth baseline of the demo's data."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from PIL import Image  # noqa: E402

from dense_data.nyu import write_nyu_sample  # noqa: E402
from dense_data.synthetic import make_scene  # noqa: E402
from tasks.depth import DepthTask  # noqa: E402
from tasks.metrics.depth import METRIC_NAMES, DepthMetrics  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
DEPTH_KEYS = {f"val/{name}" for name in METRIC_NAMES}
# abs_rel of predicting the mean training depth everywhere, on the demo_dpt validation set (see test below).
DEMO_MEAN_DEPTH_ABS_REL = 0.3986


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_demo_dpt_trains_and_writes_metrics_checkpoint_and_picture(tmp_path, train_cli):
    run_dir = tmp_path / "run"
    result = train_cli("task=demo_dpt", "trainer.max_steps=4", "trainer.val_check_interval=2",
                       "data.train.num_images=8", "data.val.num_images=3", "data.batch_size=4", "data.num_workers=0",
                       "optim.warmup_steps=1", "module.num_vis=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert set(metrics) == DEPTH_KEYS
    assert all(v is not None and np.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["val/delta1"] <= metrics["val/delta2"] <= metrics["val/delta3"] <= 1
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["task_class"] == "tasks.depth.DepthTask"
    pictures = sorted((run_dir / "vis").glob("val_step*.png"))
    assert pictures
    assert np.asarray(Image.open(pictures[-1])).shape == (2 * 64, 3 * 64, 3)  # 2 rows of image | gt | prediction


def _nyu_folders(root: Path) -> None:
    for split, num, seed in (("train", 6, 0), ("test", 2, 1)):
        for i in range(num):
            scene = make_scene(i, size=(60, 80), seed=seed)
            depth = scene["depth"].copy()
            depth[:3] = 0.0  # an invalid band, as NYU's borders
            write_nyu_sample(root, f"scene_{split}/rgb_{i:05d}.png", f"scene_{split}/sync_depth_{i:05d}.png",
                             scene["image"], depth, split=split)


def test_nyu_dpt_runs_on_nyu_format_folders(tmp_path, train_cli):
    root = tmp_path / "nyu"
    _nyu_folders(root)
    run_dir = tmp_path / "run"
    result = train_cli("task=nyu_dpt", "backbone=vit_test", "backbone.weights=null", "trainer=cpu",
                       f"paths.data_root={root}", "data.crop_size=[48,64]", "data.base_size=60",
                       "data.batch_size=3", "data.val_batch_size=2", "data.num_workers=0", "head.features=16",
                       "head.num_bins=16", "head.max_depth=9.5", "module.eval_mode=slide", "module.eval_crop=[48,64]",
                       "module.eval_stride=[32,32]", "trainer.max_steps=2", "trainer.val_check_interval=2",
                       "optim.warmup_steps=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(_metrics(run_dir)) == DEPTH_KEYS
    hparams = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["max_depth"] == 9.5 and hparams["eigen_crop"] and hparams["eval_flip"]  # tied to head.max_depth
    assert hparams["head"]["output"] == "bins"
    assert list((run_dir / "vis").glob("val_step*.png"))


def test_nyu_linear_is_metas_recipe_and_runs(tmp_path, train_cli):
    """task=nyu_linear: Meta's config-nyu.yaml values, and a 3-step run through its one-cycle schedule."""
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["task=nyu_linear"])
    assert cfg.head._target_ == "heads.linear_depth.LinearDepthHead" and list(cfg.backbone.out_indices) == [-1]
    assert (cfg.head.num_bins, cfg.head.min_depth, cfg.head.max_depth, cfg.head.use_cls) == (256, 0.001, 10.0, False)
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.decay_all) == (
        3e-4, [0.9, 0.99], 1e-4, True)
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.trainer.max_steps) == ("one_cycle", 12800, 38400)
    assert cfg.optim.one_cycle.final_div_factor == 1000.0 and cfg.trainer.gradient_clip_val == 35.0
    assert list(cfg.data.crop_size) == [416, 544] and cfg.module.eigen_crop and cfg.module.eval_flip
    assert cfg.module.align == "none" and cfg.module.crop_rounding == "floor" and not cfg.module.max_inclusive
    root = tmp_path / "nyu"
    _nyu_folders(root)
    run_dir = tmp_path / "run"
    result = train_cli("task=nyu_linear", "backbone=vit_test", "backbone.weights=null", "trainer=cpu",
                       f"paths.data_root={root}", "data.crop_size=[48,64]", "data.base_size=60",
                       "data.batch_size=3", "data.val_batch_size=2", "data.num_workers=0",
                       "trainer.max_steps=3", "trainer.val_check_interval=3", "optim.warmup_steps=1",
                       f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(_metrics(run_dir)) == DEPTH_KEYS
    scheduler = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["lr_schedulers"][0]
    assert (scheduler["total_steps"], scheduler["warmup_steps"], scheduler["final_div_factor"]) == (3, 1, 1000.0)


def test_released_depther_eval_preset_is_metas():
    """task=nyu_dpt_released_eval: config-nyu-synthmix-dpt-inference.yaml's evaluation on Meta's depther layout."""
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["task=nyu_dpt_released_eval"])
    assert cfg.backbone.name == "vit7b16" and cfg.trainer.max_steps == 0 and cfg.head.weights is None
    assert (cfg.head.features, cfg.head.post_channels, cfg.head.output, cfg.head.max_depth) == (512, "meta", "bins", 100.0)
    assert (cfg.head.bin_placement, cfg.head.bin_norm, cfg.head.fusion_upsample, cfg.head.input_padding) == (
        "linspace", "linear", "x2", "center")
    assert cfg.data.eval_short_side == 768 and cfg.module.align == "least_squares" and cfg.module.eval_flip
    assert (cfg.module.min_depth, cfg.module.max_depth, cfg.module.eigen_crop) == (0.001, 10.0, True)


def _task(**kwargs) -> DepthTask:
    torch.manual_seed(0)
    head = {"_target_": "heads.dpt.DPTHead", "features": 16, "head_hidden": 8}
    return DepthTask({"name": "vit_test", "weights": None}, head, **kwargs).eval()


def _batch(sizes: list[tuple[int, int]], gt_sizes: list[tuple[int, int]]) -> dict:
    """Images of ``sizes`` (network input, padded to the largest) with ground truth of ``gt_sizes``."""
    generator = torch.Generator().manual_seed(1)
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    gt_h, gt_w = max(s[0] for s in gt_sizes), max(s[1] for s in gt_sizes)
    images, depth = torch.zeros(len(sizes), 3, height, width), torch.zeros(len(sizes), gt_h, gt_w)
    meta = []
    for i, ((h, w), (gh, gw)) in enumerate(zip(sizes, gt_sizes)):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        gt = torch.rand(gh, gw, generator=generator) * 8 + 0.5
        gt[: gh // 4] = 0.0  # invalid rows
        depth[i, :gh, :gw] = gt
        meta.append({"image_size": (h, w), "orig_size": (gh, gw)})
    return {"image": images, "depth": depth, "meta": meta}


@pytest.mark.parametrize("flip", [False, True])
def test_validation_equals_depth_metrics_on_the_dense_output(flip):
    task = _task(eval_flip=flip, align="median", eigen_crop=True, max_depth=9.0)
    # image 0 was resized for the network (48x64 input, 60x80 ground truth); image 1 is at its file size.
    batch = _batch([(48, 64), (32, 48)], [(60, 80), (32, 48)])
    reference = DepthMetrics(min_depth=1e-3, max_depth=9.0, eigen_crop=True, align="median")
    with torch.no_grad():
        task.validation_step(batch, 0)
        for image, gt, meta in zip(batch["image"], batch["depth"], batch["meta"]):
            (h, w), (gh, gw) = meta["image_size"], meta["orig_size"]
            x = image[None, :, :h, :w]
            depth = task.dense(x)
            if flip:  # hand check of the TTA: mean of the prediction and the un-flipped prediction of the flip
                depth = 0.5 * (depth + task.dense(x.flip(-1)).flip(-1))
            reference.update(F.interpolate(depth, (gh, gw), mode="bilinear", align_corners=False), gt[None, :gh, :gw])
    got, want = task.val_metrics.compute(), reference.compute()
    assert int(task.val_metrics.count) == 2
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name
    # A default (no align, no crop) metric gives other values: the task's settings were used.
    plain = DepthMetrics(max_depth=9.0)
    with torch.no_grad():
        for image, gt, meta in zip(batch["image"], batch["depth"], batch["meta"]):
            (h, w), (gh, gw) = meta["image_size"], meta["orig_size"]
            plain.update(task.dense_tta(image[None, :, :h, :w]), gt[None, :gh, :gw])
    assert plain.compute()["abs_rel"] != pytest.approx(got["abs_rel"], rel=1e-3)


def test_flip_tta_averages_the_flipped_prediction():
    task = _task(eval_flip=True)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain, flipped = task.dense(x), task.dense(x.flip(-1))
        tta = task.dense_tta(x)
        whole = task.predict_depth(list(x))
    assert plain.shape == (2, 1, 32, 48)
    assert not torch.allclose(flipped.flip(-1), plain, atol=1e-4)  # the model is not flip-symmetric: the check can fail
    torch.testing.assert_close(tta, 0.5 * (plain + flipped.flip(-1)))
    torch.testing.assert_close(tta[:, :, 5, 7], 0.5 * (plain[:, :, 5, 7] + flipped[:, :, 5, 48 - 1 - 7]))
    torch.testing.assert_close(torch.stack(whole), tta)


def test_demo_mean_depth_baseline():
    """The number the demo must beat: abs_rel of the constant mean training depth on the demo's val set."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["task=demo_dpt"])
    train, val = instantiate(cfg.data.train), instantiate(cfg.data.val)
    mean = float(np.mean([train[i]["depth"].astype(np.float64).mean() for i in range(len(train))]))
    metrics = DepthMetrics(cfg.module.min_depth, cfg.module.max_depth)
    for i in range(len(val)):
        gt = torch.from_numpy(val[i]["depth"])[None]
        metrics.update(torch.full_like(gt, mean), gt)
    assert metrics.compute()["abs_rel"] == pytest.approx(DEMO_MEAN_DEPTH_ABS_REL, abs=5e-4)
