"""Train a head on a DINOv3 backbone: ``python train.py [task=NAME] [key=value ...]``.

Builds, in this order, the data (failing at once on missing datasets), the Lightning task (backbone +
head), the Trainer with checkpoints, CSV / TensorBoard logs and ``metrics.json``; then fits.
``resume=auto`` continues the run in ``hydra.run.dir`` from its ``checkpoints/last.ckpt`` (or starts it), and
``resume=RUN_DIR`` or ``resume=PATH.ckpt`` continues that run in its own folder.
"""

import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from backbones import WeightsError
from tasks.callbacks import LastCheckpoint, MetricsJson, RandomState
from tasks.checkpoint_io import AtomicCheckpointIO

# A frozen backbone stays in eval mode while the head trains: Lightning's warning about it is expected.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# A resumed run appends to its logs (see _loggers, which keeps the metrics.csv Lightning would delete).
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


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


def resume_checkpoint(resume: str | None, output_dir: Path) -> str | None:
    """The checkpoint ``resume`` names: ``auto`` the run folder's ``last.ckpt`` if there is one (else None: a new
    run), a run folder its ``checkpoints/last.ckpt``, a file itself. Exits with code 2 when it does not exist."""
    if resume in (None, "", False):
        return None
    if resume == "auto":
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        print(f"resume=auto: no {last} yet, starting the run")
        return None
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        print(f"error: resume={resume}: no checkpoint at {path}", file=sys.stderr)
        sys.exit(2)
    return str(path)


def check_checkpoint(path: str) -> None:
    """Exit with code 2 naming ``path`` when it is not a checkpoint ``torch.load(weights_only=True)`` accepts
    (truncated, or holding objects that would run code when unpickled). Memory-mapped: tensors are not read."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the file cannot be resumed from
        reason = " ".join(str(err).split())[:300]
        print(f"error: cannot resume from {path}: refused by torch.load(weights_only=True) or unreadable "
              f"({type(err).__name__}: {reason})", file=sys.stderr)
        sys.exit(2)


def resume_run_dir(argv: list[str]) -> list[str]:
    """``argv`` with ``hydra.run.dir`` set to the run that ``resume=RUN_DIR`` or ``resume=RUN_DIR/checkpoints/X.ckpt``
    names, so the run continues in its own folder (unless ``hydra.run.dir`` is given)."""
    values = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("resume=")]
    if not values or values[-1] in ("auto", "null", "") or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    path = Path(values[-1]).expanduser()
    if path.is_dir():
        return [*argv, f"hydra.run.dir={path.resolve()}"]
    if path.is_file() and path.parent.name == "checkpoints":
        return [*argv, f"hydra.run.dir={path.parent.parent.resolve()}"]
    return argv


def _loggers(output_dir: Path, resuming: bool) -> list:
    """CSV and TensorBoard loggers; a resumed run appends to the latest version of each."""
    def version(name: str) -> int | None:
        versions = sorted(int(p.name.split("_")[1]) for p in (output_dir / name).glob("version_*")
                          if p.name.split("_")[1].isdigit())
        return versions[-1] if resuming and versions else None

    csv = CSVLogger(output_dir, name="csv", version=version("csv"))
    metrics_file = Path(csv.log_dir) / "metrics.csv"
    if rank_zero_only.rank == 0 and metrics_file.is_file():
        rows = metrics_file.read_text()
        writer = csv.experiment  # Lightning deletes an existing metrics.csv here: put it back, keep its columns
        metrics_file.write_text(rows)
        writer.metrics_keys = sorted(k for k in rows.split("\n", 1)[0].strip().split(",") if k)
    return [csv, TensorBoardLogger(output_dir, name="tensorboard", version=version("tensorboard"))]


def _trainer_options(options: dict, module) -> dict:
    """``lightning.Trainer`` arguments from ``cfg.trainer``: a ``strategy`` given as ``{_target_: ...}`` is built
    with the task (``tasks.strategies``), ``plugins`` entries are instantiated, checkpoints are written atomically."""
    options = dict(options)
    if isinstance(options.get("strategy"), dict):
        options["strategy"] = instantiate(options["strategy"], module=module)
    plugins = [instantiate(p) if isinstance(p, dict) else p for p in options.pop("plugins", None) or []]
    options["plugins"] = [*plugins, AtomicCheckpointIO()]
    return options


def train(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    print(f"output folder: {output_dir}")
    ckpt_path = resume_checkpoint(cfg.get("resume"), output_dir)
    if ckpt_path:
        check_checkpoint(ckpt_path)
        print(f"resuming from {ckpt_path}")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = _build("data", cfg.data)
    container = OmegaConf.to_container(cfg, resolve=True)
    module = _build("model", cfg.module, _recursive_=False, _convert_="all",
                    backbone=container["backbone"], head=container["head"], optim=container["optim"],
                    num_classes=datamodule.num_classes, class_names=datamodule.class_names,
                    vis_dir=str(output_dir / "vis"))
    metrics_json = MetricsJson(output_dir / "metrics.json")
    last = LastCheckpoint(output_dir / "checkpoints" / "last.ckpt", **container["checkpoint"])
    callbacks = [
        ModelCheckpoint(dirpath=output_dir / "checkpoints", monitor=cfg.monitor, mode=cfg.monitor_mode,
                        save_last=True, filename="best-{step}", enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        metrics_json,
        RandomState(),
        last,
    ]
    trainer = L.Trainer(**_trainer_options(container["trainer"], module), callbacks=callbacks,
                        logger=_loggers(output_dir, resuming=ckpt_path is not None), default_root_dir=output_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # after the step in which a signal arrived: `last` saved that step, or did not catch it
        if last.stopped_by is None:
            raise
    if last.stopped_by is not None:
        if trainer.is_global_zero:
            print(f"stopped at step {trainer.global_step} by a signal; continue with resume=auto "
                  f"hydra.run.dir={output_dir}")
        sys.exit(128 + last.stopped_by)
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
    sys.argv = [sys.argv[0], *resume_run_dir(sys.argv[1:])]
    main()
