"""End-to-end runs of ``train.py`` as a user types them, on tiny models and the synthetic data."""

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from backbones import build_backbone
from dense_data.synthetic import write_ade20k, write_class_folders
from tasks import SegmentationTask

TINY = ["trainer.max_steps=6", "trainer.val_check_interval=3", "data.train.num_images=16", "data.val.num_images=4",
        "data.batch_size=4", "data.num_workers=0", "data.crop_size=64", "data.base_size=64"]


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_demo_writes_checkpoints_logs_pictures_and_metrics(tmp_path, train_cli):
    torch.manual_seed(0)
    source = build_backbone("vit_test")
    save_file(source.model.state_dict(), tmp_path / "vit_test.safetensors")
    run_dir = tmp_path / "run"
    result = train_cli(*TINY, f"backbone.weights={tmp_path / 'vit_test.safetensors'}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"output folder: {run_dir}" in result.stdout
    metrics = _metrics(run_dir)
    assert set(metrics) == {"val/mIoU", "val/acc"} and 0 <= metrics["val/mIoU"] <= 1
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert list((run_dir / "vis").glob("val_step*.png"))
    assert (run_dir / "csv" / "version_0" / "metrics.csv").exists()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))

    # The frozen backbone is not stored (it comes back from backbone.weights) and the reload predicts the same.
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["task_class"] == "tasks.segmentation.SegmentationTask"
    assert not any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    task = SegmentationTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(task.backbone(images).maps[-1], source.eval()(images).maps[-1])
        head_state = {k[5:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("head.")}
        assert all(torch.equal(task.head.state_dict()[k], v) for k, v in head_state.items())


def test_missing_dataset_fails_fast_with_a_clear_message(train_cli):
    start = time.monotonic()
    result = train_cli("task=ade20k_linear", "paths.data_root=/nonexistent")
    assert result.returncode == 2
    assert "dataset folder not found: /nonexistent" in result.stderr
    assert "ADEChallengeData2016/images" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60


def test_ade20k_reader_trains_on_generated_folders(tmp_path, train_cli):
    write_ade20k(tmp_path / "ade", num_train=8, num_val=3, size=(64, 96))
    run_dir = tmp_path / "run"
    result = train_cli("task=ade20k_linear", "backbone=vit_test", "trainer=cpu", f"paths.data_root={tmp_path / 'ade'}",
                       "data.crop_size=64", "data.base_size=64", "data.eval_short_side=64", "data.num_workers=0",
                       "data.batch_size=4", "module.eval_crop=64", "module.eval_stride=43", "trainer.max_steps=4",
                       "trainer.val_check_interval=2", "optim.warmup_steps=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/mIoU" in _metrics(run_dir)


def test_class_folders_train_a_linear_classifier(tmp_path, train_cli):
    write_class_folders(tmp_path / "imnet", num_train=16, num_val=8, size=(48, 48))
    run_dir = tmp_path / "run"
    result = train_cli("task=imagenet_linear", "backbone=vit_test", "trainer=cpu", f"paths.data_root={tmp_path / 'imnet'}",
                       "data.num_classes=5", "data.crop_size=32", "data.base_size=32", "data.eval_short_side=32",
                       "data.eval_center_crop=32", "data.num_workers=0", "data.batch_size=8", "trainer.max_steps=4",
                       "trainer.val_check_interval=2", "optim.warmup_steps=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert set(metrics) == {"val/top1", "val/top5"} and metrics["val/top5"] == 1.0  # 5 classes: top-5 is all
    assert list((run_dir / "vis").glob("val_step*.png"))


@pytest.mark.parametrize("strategy", [["trainer.strategy=ddp_spawn"], ["trainer=ddp"]], ids=["ddp_spawn", "ddp"])
def test_two_process_ddp_trains(tmp_path, train_cli, strategy):
    """2 CPU processes: ``ddp_spawn``, and the ``trainer=ddp`` config users run (Lightning relaunches train.py)."""
    run_dir = tmp_path / "run"
    result = train_cli(*TINY, *strategy, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                       "trainer.sync_batchnorm=false", f"hydra.run.dir={run_dir}")  # SyncBN needs GPUs
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/mIoU" in _metrics(run_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one output folder for both processes


def test_non_finite_loss_names_the_term_and_files():
    task = SegmentationTask(backbone={"name": "vit_test"}, head={"_target_": "heads.LinearSegHead"}, num_classes=3)
    task.head.loss = lambda outputs, targets: {"loss_ce": torch.tensor(float("nan"))}
    batch = {"image": torch.randn(1, 3, 32, 32), "mask": torch.zeros(1, 32, 32, dtype=torch.long),
             "meta": [{"file": "broken_0001.jpg"}]}
    with pytest.raises(FloatingPointError, match=r"loss_ce.*broken_0001.jpg"):
        task.training_step(batch, 0)
