"""Mask2Former through ``train.py``: the ADE20K recipe on generated folders, single process and 2-process DDP."""

import json

import numpy as np
from PIL import Image

from dense_data.synthetic import write_ade20k

M2F_TINY = ["backbone=vit_test", "trainer=cpu", "head.hidden_dim=32", "head.num_queries=8", "head.dec_layers=2",
            "head.enc_layers=1", "head.num_heads=4", "head.num_points=256", "data.crop_size=64", "data.base_size=64",
            "data.eval_short_side=64", "data.num_workers=0", "data.batch_size=2", "module.eval_crop=64",
            "module.eval_stride=43", "trainer.max_steps=4", "trainer.val_check_interval=2", "optim.warmup_steps=1"]


def test_ade20k_m2f_runs_end_to_end(tmp_path, train_cli):
    write_ade20k(tmp_path / "ade", num_train=4, num_val=2, size=(64, 96))
    run_dir = tmp_path / "run"
    result = train_cli("task=ade20k_m2f", f"paths.data_root={tmp_path / 'ade'}", *M2F_TINY, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"val/mIoU", "val/acc"}
    assert list((run_dir / "vis").glob("*.png"))


def test_ddp_with_an_unlabelled_image_does_not_hang(tmp_path, train_cli):
    """One rank gets an image whose pixels are all ignore: no error, no hang (bounded by the timeout)."""
    base = write_ade20k(tmp_path / "ade", num_train=4, num_val=2, size=(64, 64))
    for label in sorted((base / "annotations" / "training").glob("*.png"))[::2]:
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(label)
    run_dir = tmp_path / "run"
    result = train_cli("task=ade20k_m2f", f"paths.data_root={tmp_path / 'ade'}", *M2F_TINY,
                       "data.batch_size=1", "data.scale_range=[1.0,1.0]", "trainer.accelerator=cpu",
                       "trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.sync_batchnorm=false",
                       f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "metrics.json").exists()
