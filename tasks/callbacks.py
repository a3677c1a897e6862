"""Callbacks of every run: ``metrics.json``, random states in checkpoints, and a ``last.ckpt`` kept current
(every n steps, on a preemption signal, at the end)."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException


class MetricsJson(L.Callback):
    """Writes the latest validation metrics (``val/...``) and the step they were taken at to ``path``.

    The step is part of the checkpoint, so a resumed run knows whether its last step was validated.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.step = trainer.global_step
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
        metrics = {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(metrics, indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state.get("step")


class RandomState(L.Callback):
    """Stores the random states of torch (CPU and CUDA), numpy and Python in checkpoints and restores them when
    training resumes, so dropout and sampled points continue as in an uninterrupted run.

    Every process starts from the same seed (``seed_everything``) and draws alike, so rank 0's states, the ones
    saved, stand for all ranks. The data order and augmentations do not depend on these states
    (``dense_data.sampling``).
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        # Tensors, ints and tuples only: the checkpoint stays loadable with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "gauss": float(gauss)}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        numpy = state["numpy"]
        np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                             numpy["has_gauss"], numpy["gauss"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class Preempted(SIGTERMException):
    """Training stopped on a signal after writing its checkpoint (a ``SystemExit``, like Lightning's own)."""


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this job (array jobs: ``JOB_TASK``), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    else:
        job = os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


class LastCheckpoint(L.Callback):
    """Keeps ``path`` (``checkpoints/last.ckpt``) current: every ``every_n_steps`` optimizer steps, when training
    ends, and after a preemption signal.

    A signal in ``signals`` (SLURM sends ``SIGUSR1`` before the time limit with ``--signal=USR1@SECONDS`` and
    ``SIGTERM`` on preemption) only sets a flag; at the end of the current step every process agrees to stop, the
    checkpoint is written, the job is requeued with ``scontrol requeue`` (``requeue=True`` and inside SLURM) and
    ``Preempted`` ends training without a further validation. (Lightning itself ends the step in which SIGTERM
    arrived with ``SIGTERMException``; the checkpoint is then written in ``on_exception``.) Stopping at a step
    boundary makes the resumed run continue exactly where this one stopped.
    ``stopped_by`` is then the signal's number. Saves go through the trainer (all ranks; the strategy's
    checkpoint IO writes atomically, see ``tasks.checkpoint_io``).
    """

    def __init__(self, path: str | Path, every_n_steps: int | None = None,
                 signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True):
        self.path = Path(path)
        self.every_n_steps = every_n_steps or 0
        self.signals = [getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.stopped_by: int | None = None
        self._saved_step: int | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the data workers fork (they inherit the handler instead of dying on SIGUSR1) and before Lightning
        # registers its own SIGTERM handler, which then calls this one after its own.
        if stage == "fit" and not self._previous and self.signals \
                and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.signals}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._stop(trainer)
            raise Preempted(128 + self.stopped_by)
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning turns SIGTERM into SIGTERMException at the end of the step in which it arrived: a step boundary.
        if isinstance(exception, SIGTERMException) and self.received is not None and self.stopped_by is None:
            self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        """Save and requeue (rank 0, inside SLURM)."""
        self.save(trainer)
        self.stopped_by = int(self.received or signal.SIGTERM)
        job = slurm_job_id()
        if trainer.is_global_zero:
            print(f"signal {signal.Signals(self.stopped_by).name} at step {trainer.global_step}: saved {self.path}",
                  file=sys.stderr)
            if self.requeue and job:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                print(f"scontrol requeue {job}: exit code {result.returncode} {result.stderr.strip()}", file=sys.stderr)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer)

