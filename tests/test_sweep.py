"""One-pass sweep: the grid, each head equal to the same head trained alone, the best head as a plain checkpoint."""

import json

import lightning as L
import pytest
import torch

from dense_data.datamodule import DenseDataModule
from dense_data.synthetic import SyntheticScenes
from tasks import ClassificationTask, SegmentationTask, load_predictor
from tasks.sweep import META_LEARNING_RATES, sweep_grid, sweep_task

SEG_HEAD = {"_target_": "heads.LinearSegHead", "dropout": 0.3}
CLS_HEAD = {"_target_": "heads.LinearClassifier", "n_last_blocks": 2, "avgpool": True}


def _fit(tmp_path, head: dict, optim: dict, targets=("mask",), sweep=None, cache=None, clip=None, steps=4):
    """What train.py does, in process: seed, data, task (plain or sweep), fit with a validation at the end.

    Without the cache the pipeline is made deterministic (no resize, crop = image, no flip or colour jitter):
    albumentations draws its own random seed, which ``seed_everything`` does not set. The cache seeds each view.
    """
    L.seed_everything(0, workers=True)
    augment = {} if cache else {"scale_range": (1.0, 1.0), "flip": False, "photometric": False}
    data = DenseDataModule(SyntheticScenes(16, (48, 48)), SyntheticScenes(4, (48, 48), seed=1), list(targets),
                           num_classes=6 if "mask" in targets else 5, crop_size=48 if not cache else 32,
                           base_size=48 if not cache else 32, batch_size=4, num_workers=0, cache=cache, **augment)
    kwargs = dict(backbone={"name": "vit_test"}, head=head, optim=optim, num_classes=data.num_classes, vis_dir=None)
    if sweep is not None:
        module = sweep_task(list(targets), sweep=sweep, **kwargs)
    else:
        module = (SegmentationTask if "mask" in targets else ClassificationTask)(**kwargs)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=clip,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return module


def test_grid_is_metas_by_default_and_the_product_of_the_axes():
    grid = sweep_grid({}, {"_target_": "heads.LinearClassifier"}, {"weight_decay": 0.0})
    assert [p["lr"] for p in grid] == list(META_LEARNING_RATES) and len(grid) == 13
    grid = sweep_grid({"lr": [0.1, 0.01], "weight_decay": [0.0, 1e-4], "head": {"n_last_blocks": [1, 4]}},
                      CLS_HEAD, {})
    assert len(grid) == 8 and grid[0]["name"] == "lr=0.1,wd=0,n_last_blocks=1"
    assert grid[1]["head"] == {**CLS_HEAD, "n_last_blocks": 4} and grid[-1]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="non-empty lists"):
        sweep_grid({"head": {"avgpool": True}}, CLS_HEAD, {})


def test_each_segmentation_head_equals_the_head_trained_alone(tmp_path):
    """Dropout, BatchNorm, AdamW and gradient clipping: head i of the sweep == a lone run at its lr / wd."""
    optim = {"lr": 1e-3, "weight_decay": 1e-3, "warmup_steps": 2}
    sweep = {"lr": [1e-2, 3e-2], "weight_decay": [0.0, 0.1], "scale_lr": False}
    swept = _fit(tmp_path / "sweep", SEG_HEAD, optim, sweep=sweep, clip=0.05)
    for index in (0, 3):
        point = swept.grid[index]
        alone = _fit(tmp_path / f"alone{index}", SEG_HEAD, {**optim, "lr": point["lr"],
                                                             "weight_decay": point["weight_decay"]}, clip=0.05)
        for key, value in alone.head.state_dict().items():
            torch.testing.assert_close(swept.head.heads[index].state_dict()[key], value, rtol=1e-6, atol=1e-7)

    # The best head is a plain checkpoint: load_predictor rebuilds it, and it predicts as the sweep's head did.
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(report["heads"]) == {p["name"] for p in swept.grid}
    best = [p["name"] for p in swept.grid].index(report["best"]["name"])
    predictor = load_predictor(tmp_path / "sweep" / "checkpoints" / "sweep_best.ckpt")
    images = torch.randn(1, 3, 32, 32)
    swept.eval()
    with torch.no_grad():
        features = swept.backbone(images)
        head = swept.head.heads[best]
        expected = head.predict(head(features, features.padded_size), features.padded_size)
        torch.testing.assert_close(predictor.model(images), expected, rtol=1e-5, atol=1e-5)


def test_each_classification_head_equals_the_head_trained_alone_on_cached_features(tmp_path):
    """SGD (Meta's optimizer) on the frozen-feature cache (pooled maps + class tokens of two layers)."""
    optim = {"lr": 1e-2, "weight_decay": 0.0, "name": "sgd", "momentum": 0.9}
    cache = {"enabled": True, "root": str(tmp_path / "cache"), "views": 2}
    swept = _fit(tmp_path / "sweep", CLS_HEAD, optim, targets=("label",), sweep={"lr": [0.05, 0.2, 0.5], "scale_lr": True, "batch_size": 4},
                 cache=cache, steps=6)
    point = swept.grid[2]
    assert swept.effective_lr(point) == pytest.approx(0.5 * 4 / 256)  # Meta's batch scaling
    alone = _fit(tmp_path / "alone", CLS_HEAD, {**optim, "lr": swept.effective_lr(point)}, targets=("label",),
                 cache=cache, steps=6)
    for key, value in alone.head.state_dict().items():
        torch.testing.assert_close(swept.head.heads[2].state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # both runs read one cache
    checkpoint = torch.load(tmp_path / "sweep" / "checkpoints" / "sweep_best.ckpt", weights_only=True)
    assert checkpoint["task_class"] == "tasks.classification.ClassificationTask"
    assert "sweep" not in checkpoint["hyper_parameters"]


def test_sweep_refuses_a_trainable_backbone():
    with pytest.raises(ValueError, match="frozen backbone"):
        sweep_task(["mask"], sweep={"lr": [0.1]}, backbone={"name": "vit_test", "freeze": "all"}, head=SEG_HEAD,
                   optim={}, num_classes=3)
