"""One-pass sweep: many heads (learning rates, weight decays, head arguments) trained on one backbone pass.

``python train.py task=imagenet_linear sweep=lr`` trains one head per grid point on the same frozen features,
logs each (``sweep/<name>/<metric>``, ``sweep.json``), logs the best head's metric as the task's usual one
(``val/top1``, ``val/mIoU``: the best checkpoint follows it) and writes the best head as an ordinary
checkpoint of the plain task (``checkpoints/sweep_best.ckpt``, read by ``load_predictor``).

Each head trains exactly as it would alone with the same seed: it is initialised from the random state the
lone run's head would start from, every head's forward and loss draw the same random numbers (dropout
masks) as the first head's (common random numbers: the comparison between heads is not blurred by them), and
the heads' parameters sit in their own optimizer groups (own learning rate and weight decay, the task's
schedule) and are gradient-clipped one head at a time. The backbone must be frozen, or heads would interact.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .classification import ClassificationTask
from .metrics.segmentation import SegmentationMetrics
from .optim import param_groups, scheduled_optimizer
from .segmentation import SegmentationTask

# Meta's linear-probe learning rates (per 256 images of global batch), dinov3/eval/linear.py.
META_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
BEST_FILE = "sweep_best.ckpt"


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_grid(sweep: dict, head: dict, optim: dict) -> list[dict]:
    """The grid points: ``name``, base ``lr``, ``weight_decay`` and the head config of each.

    ``sweep``: ``lr`` (list), ``weight_decay`` (list or None: ``optim.weight_decay``), ``head`` (head argument ->
    list of values). The name lists every swept value, e.g. ``lr=0.001,n_last_blocks=4``.
    """
    lrs = list(sweep.get("lr") or META_LEARNING_RATES)
    decays = sweep.get("weight_decay")
    head_axes = dict(sweep.get("head") or {})
    unknown = [k for k, v in head_axes.items() if not isinstance(v, (list, tuple)) or not v]
    if unknown:
        raise ValueError(f"sweep.head values must be non-empty lists, not {[head_axes[k] for k in unknown]} "
                         f"for {unknown}")
    grid = []
    decay_values = list(decays) if decays else [optim.get("weight_decay", 0.0)]
    head_values = list(itertools.product(*head_axes.values())) if head_axes else [()]
    for lr, decay, values in itertools.product(lrs, decay_values, head_values):
        parts = [f"lr={_fmt(float(lr))}"] + ([f"wd={_fmt(float(decay))}"] if decays else [])
        parts += [f"{k}={_fmt(v)}" for k, v in zip(head_axes, values)]
        grid.append({"name": ",".join(parts), "lr": float(lr), "weight_decay": float(decay),
                     "head": {**head, **dict(zip(head_axes, values))}})
    return grid


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class SweepHeads(nn.Module):
    """Several heads over the same features; looks like one head to the task.

    ``forward`` gives a list of outputs, ``loss`` the terms of every head (``<term>/<head name>``),
    ``predict`` the heads' predictions concatenated along dim 1 (``(B, N*K, ...)``; linear in the outputs, so a
    sliding window averages each head's scores as it would alone). Every head's forward and loss start from
    the same random state and leave the state the first head leaves (what a lone run of any head would see).
    """

    def __init__(self, heads: list[nn.Module], names: list[str]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.names = list(names)

    def _each(self, fn, *args) -> list:
        device = next(self.parameters()).device
        start, after, results = _rng_state(device), None, []
        for i, head in enumerate(self.heads):
            _set_rng_state(start, device)
            results.append(fn(head, i, *args))
            after = _rng_state(device) if i == 0 else after
        _set_rng_state(after, device)
        return results

    def forward(self, features, image_size) -> list:
        return self._each(lambda head, i: head(features, image_size))

    def loss(self, outputs: list, targets: dict) -> dict[str, torch.Tensor]:
        losses = self._each(lambda head, i: head.loss(outputs[i], targets))
        return {f"{term}/{name}": value for name, terms in zip(self.names, losses) for term, value in terms.items()}

    def predict(self, outputs: list, image_size) -> torch.Tensor:
        return torch.cat([head.predict(out, image_size) for head, out in zip(self.heads, outputs)], dim=1)


class _Sweep:
    """What every sweep task adds to its plain task (mixed in before it)."""

    base_task: type
    metric: str  # the per-head metric that picks the best head (higher is better)

    def __init__(self, *args, sweep: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.backbone.freeze != "frozen":
            raise ValueError(f"a sweep needs a frozen backbone (backbone.freeze=frozen), got {self.backbone.freeze!r}")
        self.best: dict | None = None

    @property
    def grid(self) -> list[dict]:
        return sweep_grid(self.hparams["sweep"] or {}, self.hparams["head"], self.hparams["optim"] or {})

    def build_head(self, head: dict, num_classes: int | None) -> nn.Module:
        """One head per grid point, each from the random state the lone run's head starts from."""
        start, after, heads = torch.random.get_rng_state(), None, []
        for i, point in enumerate(self.grid):
            torch.random.set_rng_state(start)
            heads.append(super().build_head(point["head"], num_classes))
            after = torch.random.get_rng_state() if i == 0 else after
        torch.random.set_rng_state(after)
        return SweepHeads(heads, [p["name"] for p in self.grid])

    def effective_lr(self, point: dict) -> float:
        """The grid's lr, times global batch / 256 with ``sweep.scale_lr`` (Meta's rule)."""
        sweep = self.hparams["sweep"] or {}
        if not sweep.get("scale_lr"):
            return point["lr"]
        trainer = self._trainer
        world = trainer.world_size * trainer.accumulate_grad_batches if trainer is not None else 1
        return point["lr"] * int(sweep["batch_size"]) * world / 256.0

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else self.optim.get("warmup_steps", 0) + 1
        groups, empty = [], nn.Module()
        for point, head in zip(self.grid, self.head.heads):
            for group in param_groups(head, empty, self.effective_lr(point), point["weight_decay"], 0.0,
                                      self.optim.get("decay_all", False)):
                group["name"] = f"{point['name']}/{group['name']}"
                groups.append(group)
        options = {k: v for k, v in self.optim.items()
                   if k not in ("lr", "weight_decay", "backbone_lr_mult", "decay_all")}
        return scheduled_optimizer(groups, total, **options)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip each head's gradients on their own (a global norm would couple the heads)."""
        if not gradient_clip_val:
            return
        for head in self.head.heads:
            params = [p for p in head.parameters() if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ------------------------------------------------------------ results
    def log_sweep(self, results: list[dict[str, float]]) -> dict[str, float]:
        """Log every head's metrics, return (and log as ``val/...``) the best head's; keep the best checkpoint."""
        for name, metrics in zip(self.head.names, results):
            for key, value in metrics.items():
                self.log(f"sweep/{name}/{key}", value, sync_dist=False)
        scores = torch.tensor([r[self.metric] for r in results]).nan_to_num(-1.0)
        index = int(scores.argmax())
        for key, value in results[index].items():
            self.log(f"val/{key}", value, prog_bar=key == self.metric, sync_dist=False)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return results[index]
        out_dir = Path(self.trainer.default_root_dir)
        table = {name: {k: float(v) for k, v in r.items()} for name, r in zip(self.head.names, results)}
        if self.best is None or float(scores[index]) > self.best["score"]:
            self.best = {"name": self.head.names[index], "score": float(scores[index]), "step": self.global_step}
            self.save_best(index, out_dir / "checkpoints" / BEST_FILE)
        (out_dir / "sweep.json").write_text(json.dumps({"metric": self.metric, "step": self.global_step,
                                                        "best": self.best, "heads": table}, indent=1) + "\n")
        return results[index]

    def save_best(self, index: int, path: Path) -> None:
        """The chosen head as a checkpoint of the plain task (as if it had been trained alone)."""
        point = self.grid[index]
        hparams = {k: v for k, v in self.hparams.items() if k != "sweep"}
        hparams["head"] = point["head"]
        hparams["optim"] = {**(hparams.get("optim") or {}), "lr": self.effective_lr(point),
                            "weight_decay": point["weight_decay"]}
        state = {f"head.{k}": v.detach().cpu() for k, v in self.head.heads[index].state_dict().items()}
        if not self.hparams["backbone"].get("weights"):  # random init: the weights live only here
            state.update({f"backbone.{k}": v.detach().cpu() for k, v in self.backbone.state_dict().items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state, "hyper_parameters": hparams, "global_step": self.global_step,
                    "task_class": f"{self.base_task.__module__}.{self.base_task.__qualname__}",
                    "pytorch-lightning_version": L.__version__, "sweep": {"head": point["name"], **self.best}}, path)


class ClassificationSweep(_Sweep, ClassificationTask):
    """Linear-probe sweep: top-1 / top-5 per head; the best head by top-1."""

    base_task = ClassificationTask
    metric = "top1"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k = self.num_classes
        self.sweep_top1 = nn.ModuleList(MulticlassAccuracy(k, top_k=1, average="micro") for _ in self.head.heads)
        self.sweep_top5 = nn.ModuleList(MulticlassAccuracy(k, top_k=min(5, k), average="micro")
                                        for _ in self.head.heads)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.pad_to_stride(batch["image"])
        logits = self.head.predict(self(images), tuple(images.shape[-2:]))
        for top1, top5, chunk in zip(self.sweep_top1, self.sweep_top5, logits.split(self.num_classes, dim=1)):
            top1.update(chunk, batch["label"])
            top5.update(chunk, batch["label"])

    def on_validation_epoch_end(self) -> None:
        results = [{"top1": top1.compute(), "top5": top5.compute()} for top1, top5 in zip(self.sweep_top1,
                                                                                         self.sweep_top5)]
        for metric in [*self.sweep_top1, *self.sweep_top5]:
            metric.reset()
        self.log_sweep(results)


class SegmentationSweep(_Sweep, SegmentationTask):
    """Segmentation-head sweep (linear probes): mIoU / pixel accuracy per head; the best head by mIoU."""

    base_task = SegmentationTask
    metric = "mIoU"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sweep_metrics = nn.ModuleList(SegmentationMetrics(self.num_classes) for _ in self.head.heads)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.network_images(batch)
        for scores, mask, meta in zip(self.predict_scores(images), batch["mask"], batch["meta"]):
            height, width = meta["orig_size"]
            mask = mask[:height, :width]
            if scores.shape[-2:] != mask.shape:
                scores = F.interpolate(scores[None], mask.shape, mode="bilinear", align_corners=False)[0]
            for metrics, chunk in zip(self.sweep_metrics, scores.split(self.num_classes)):
                metrics.update(chunk.argmax(0)[None], mask[None])

    def on_validation_epoch_end(self) -> None:
        results = []
        for metrics in self.sweep_metrics:
            values = metrics.compute()
            results.append({"mIoU": values["mIoU"], "acc": values["acc"]})
            metrics.reset()
        self.log_sweep(results)


def sweep_task(targets: list[str], **kwargs) -> _Sweep:
    """The sweep task for what the data trains on (``data.targets``): ``label`` or ``mask``."""
    if "label" in targets:
        return ClassificationSweep(**kwargs)
    if "mask" in targets:
        return SegmentationSweep(**kwargs)
    raise ValueError(f"sweeps train classification (label) or segmentation (mask) heads, not targets {list(targets)}")
