"""Callbacks of every run: the final validation metrics as ``metrics.json``."""

import json
import math
from pathlib import Path

import lightning as L


class MetricsJson(L.Callback):
    """Writes the latest validation metrics (``val/...``) and the step they were taken at to ``path``."""

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
