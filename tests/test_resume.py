"""Long runs: exact resume after SIGKILL and after a preemption signal, atomic checkpoint writes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dense_data.datamodule import DenseDataModule
from dense_data.synthetic import SyntheticScenes
from tasks.checkpoint_io import AtomicCheckpointIO
from train import resume_checkpoint, resume_run_dir

ROOT = Path(__file__).resolve().parents[1]
# 12 images / batch 4 = 3 batches per epoch; 10 steps cross two epoch boundaries. Validation at 4 and 8, periodic
# last.ckpt at 5 and 10. Dropout (linear head) and random augmentations make any replayed or skipped draw visible.
RUN = ["trainer.max_steps=10", "trainer.val_check_interval=4", "checkpoint.every_n_steps=5", "data.train.num_images=12",
       "data.val.num_images=2", "data.batch_size=4", "data.num_workers=0", "data.crop_size=32", "data.base_size=32",
       "data.train.size=[32,32]", "data.val.size=[32,32]", "trainer.enable_progress_bar=false"]
# train.py with a callback that sends `signal` to the process itself after optimizer step `step`.
DRIVER = """
import os, runpy, signal, sys
import lightning as L

STEP, SIGNAL = int(os.environ["SIGNAL_AT_STEP"]), getattr(signal, os.environ["SIGNAL_NAME"])


class SignalAt(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == STEP:
            os.kill(os.getpid(), SIGNAL)


class Trainer(L.Trainer):
    def __init__(self, *args, callbacks=(), **kwargs):
        super().__init__(*args, callbacks=[*callbacks, SignalAt()], **kwargs)


L.Trainer = Trainer
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(*overrides, signal_at: tuple[str, int] | None = None, env: dict | None = None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable, str(ROOT / "train.py"), *RUN, *overrides]
    if signal_at:
        env.update(SIGNAL_NAME=signal_at[0], SIGNAL_AT_STEP=str(signal_at[1]))
        command = [sys.executable, "-c", DRIVER, str(ROOT / "train.py"), *RUN, *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _final_state(run_dir: Path) -> tuple[int, dict]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _run(f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_killed_and_preempted_run_resumes_to_the_same_weights(reference, tmp_path):
    """SIGKILL after step 6 (last.ckpt of step 5: mid-epoch), resume; SIGUSR1 during step 7 (SLURM's warning before
    the time limit, in a fake SLURM job: saved at the end of step 8, requeued), resume; SIGTERM during step 9 (saved
    at its end), resume=auto. The final weights equal the uninterrupted run's bit for bit: one thread and the same
    CPU kernels run the same float operations in the same order, so any replayed or skipped sample, augmentation or
    dropout draw would show."""
    run_dir = tmp_path / "run"
    killed = _run(f"hydra.run.dir={run_dir}", signal_at=("SIGKILL", 6))
    assert killed.returncode == -9
    assert _final_state(run_dir)[0] == 5

    bin_dir = tmp_path / "bin"  # a stand-in for SLURM's scontrol that records its arguments
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    warned = _run(f"resume={run_dir}", signal_at=("SIGUSR1", 7), env=slurm)
    assert warned.returncode == 128 + 10, warned.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in warned.stdout
    assert "stopped at step 8 by a signal" in warned.stdout
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert _final_state(run_dir)[0] == 8

    terminated = _run("resume=auto", f"hydra.run.dir={run_dir}", signal_at=("SIGTERM", 9))
    assert terminated.returncode == 128 + 15, terminated.stderr[-3000:]
    assert _final_state(run_dir)[0] == 9

    finished = _run("resume=auto", f"hydra.run.dir={run_dir}")
    assert finished.returncode == 0, finished.stderr[-3000:]
    step, state = _final_state(run_dir)
    reference_step, reference_state = _final_state(reference)
    assert step == reference_step == 10
    assert state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert torch.equal(state[key], value), key
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    # One log folder, appended to by every part: the first part's validation (step 4) is still there, beside the
    # closing validation train.py runs after step 10. (The SIGUSR1 part stopped at the end of step 8 before its
    # validation, which Lightning does not repeat on resume.)
    assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["version_0"]
    with open(run_dir / "csv" / "version_0" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    validated = [int(r["step"]) for r in rows if r["val/mIoU"]]
    assert validated[0] == 3 and validated[-1] == 10
    assert not list(run_dir.glob("checkpoints/.*tmp*"))


def test_resume_of_a_missing_checkpoint_fails_with_its_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        resume_checkpoint(str(tmp_path / "nothing.ckpt"), tmp_path / "run")
    assert exit_info.value.code == 2
    assert f"no checkpoint at {tmp_path / 'nothing.ckpt'}" in capsys.readouterr().err
    assert resume_checkpoint("auto", tmp_path / "run") is None  # nothing yet: the run starts
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_checkpoint(str(run), tmp_path / "run") == str(run / "checkpoints" / "last.ckpt")
    assert resume_run_dir(["task=x", f"resume={run / 'checkpoints' / 'last.ckpt'}"])[-1] == f"hydra.run.dir={run}"
    assert resume_run_dir(["resume=auto", "hydra.run.dir=/x"]) == ["resume=auto", "hydra.run.dir=/x"]


def test_a_failed_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def save_half_then_die(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def _datamodule(num_workers: int) -> DenseDataModule:
    scenes = SyntheticScenes(num_images=10, size=[32, 32])
    return DenseDataModule(scenes, scenes, targets=["mask"], num_classes=6, crop_size=32, base_size=32, batch_size=3,
                           num_workers=num_workers, seed=7)


def test_loader_resumes_mid_epoch_without_replaying_or_skipping():
    """3 batches per epoch (10 images, batch 3, last partial batch dropped); stop after 4 batches = epoch 1, batch 1."""
    loader = _datamodule(0).train_dataloader()
    seen, state = [], None
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            seen.append(batch["image"])
            if len(seen) == 4:
                state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 1, "seed": 7}

    resumed = _datamodule(0).train_dataloader()
    resumed.load_state_dict(state)
    rest = [batch["image"] for batch in resumed]  # the rest of epoch 1
    resumed.sampler.set_epoch(2)
    rest += [batch["image"] for batch in resumed]
    assert len(rest) == len(seen) - 4
    assert all(torch.equal(a, b) for a, b in zip(rest, seen[4:]))


def test_augmentations_do_not_depend_on_the_workers():
    single = next(iter(_datamodule(0).train_dataloader()))
    workers = next(iter(_datamodule(2).train_dataloader()))
    assert torch.equal(single["image"], workers["image"]) and torch.equal(single["mask"], workers["mask"])
