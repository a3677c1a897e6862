"""Train a head on a DINOv3 backbone: ``python train.py [task=NAME] [key=value ...]``.

Builds, in this order, the data (failing at once on missing datasets), the Lightning task (backbone +
head), the Trainer with checkpoints, CSV / TensorBoard logs and ``metrics.json``; then fits.
"""

import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from backbones import WeightsError
from tasks.callbacks import MetricsJson

# A frozen backbone stays in eval mode while the head trains: Lightning's warning about it is expected.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def _build(what: str, config: DictConfig, **kwargs):
    """``instantiate`` that turns a bad dataset path or weights source into one clear line and exit code 2."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, (FileNotFoundError, WeightsError, ValueError, KeyError)):
            print(f"error building the {what}: {cause}", file=sys.stderr)
            sys.exit(2)
        raise


def train(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    print(f"output folder: {output_dir}")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = _build("data", cfg.data)
    container = OmegaConf.to_container(cfg, resolve=True)
    module = _build("model", cfg.module, _recursive_=False, _convert_="all",
                    backbone=container["backbone"], head=container["head"], optim=container["optim"],
                    num_classes=datamodule.num_classes, class_names=datamodule.class_names,
                    vis_dir=str(output_dir / "vis"))
    metrics_json = MetricsJson(output_dir / "metrics.json")
    callbacks = [
        ModelCheckpoint(dirpath=output_dir / "checkpoints", monitor=cfg.monitor, mode=cfg.monitor_mode,
                        save_last=True, filename="best-{step}"),
        LearningRateMonitor(logging_interval="step"),
        metrics_json,
    ]
    loggers = [CSVLogger(output_dir, name="csv"), TensorBoardLogger(output_dir, name="tensorboard")]
    trainer = L.Trainer(**container["trainer"], callbacks=callbacks, logger=loggers, default_root_dir=output_dir)
    trainer.fit(module, datamodule=datamodule)
    if metrics_json.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        print(f"final metrics: {metrics_json.path.read_text().strip()}")
        print(f"outputs in: {output_dir}")
    return {}


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
