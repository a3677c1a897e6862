"""``train.py task=demo_smp`` learns with combined losses; the loss keys compose from the configs."""

import csv
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def test_demo_smp_learns_with_ce_plus_lovasz(tmp_path, train_cli):
    """A shortened demo (30 steps, the full one is 150): UPerNet on the synthetic scenes, CE + 0.5 Lovasz."""
    run_dir = tmp_path / "run"
    result = train_cli("task=demo_smp", "trainer.max_steps=30", "trainer.val_check_interval=30",
                       "data.val.num_images=8", "data.num_workers=0", "trainer.enable_progress_bar=false",
                       "head.loss=[ce,lovasz]", "head.loss_weights={ce: 1.0, lovasz: 0.5}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/mIoU"] > 0.5, metrics  # 6 classes: chance is ~0.1; the full demo reaches 0.87
    (log,) = run_dir.glob("csv/**/metrics.csv")
    columns = next(csv.reader(log.open()))
    assert {"train/loss_ce", "train/loss_lovasz"} <= set(columns)


def test_loss_configs_compose():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        meta = compose("train", overrides=["task=ade20k_linear"])
        demo = compose("train", overrides=["task=demo_smp", "head.loss=[dice,focal]", "head.loss_weights=[0.5,2.0]"])
        default = compose("train")
    assert meta.head.avg_non_ignore is False and meta.head.loss == "ce"  # Meta's CE averaging in Meta's recipe
    assert default.head.avg_non_ignore is True
    assert demo.head._target_ == "heads.smp.SMPHead" and demo.head.decoder == "upernet"
    assert list(demo.head.loss) == ["dice", "focal"] and list(demo.head.loss_weights) == [0.5, 2.0]
