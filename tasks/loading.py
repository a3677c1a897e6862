"""``load_predictor``: rebuild backbone + head from a training checkpoint, an export folder or a Meta head file.

No Lightning here: the model is rebuilt with ``backbones.build_backbone`` and the head's ``_target_`` (Hydra
``instantiate``), exactly as ``DenseTask`` builds it, and the weights are loaded strictly. Meta's released head
files (``dinov3_vit7b16_ms`` / ``_lc`` / ``_dd`` / ``_de``) are recognised and converted by ``tasks.meta_heads``.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections.abc import Sequence
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath

import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from backbones import build_backbone
from dense_data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .predictor import BACKBONE_FILE, CONFIG_FILE, KINDS, DenseModel, ExportError, Predictor
from .tta import preset_settings

_TARGET_KIND = (("mask", "segmentation"), ("depth", "depth"), ("boxes", "detection"), ("label", "classification"))
# Objects a Lightning checkpoint may hold besides containers and tensors, allowed for ``weights_only`` loading.
_SAFE_GLOBALS = [PosixPath, WindowsPath, PurePosixPath, PureWindowsPath]


def task_kind(task_class: str | type) -> str:
    """The kind of a task class (or its dotted path): its ``kind`` attribute, else what its ``targets`` are."""
    if isinstance(task_class, str):
        module_name, _, name = task_class.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ExportError(f"cannot import the task class {task_class!r}: {err}") from err
    else:
        cls = task_class
    kind = getattr(cls, "kind", None)
    if isinstance(kind, str) and kind in KINDS:
        return kind
    from .segmentation import SegmentationTask

    if isinstance(cls, type) and issubclass(cls, SegmentationTask):
        return "segmentation"
    targets = tuple(getattr(cls, "targets", ()))
    for target, kind in _TARGET_KIND:
        if target in targets:
            return kind
    raise ExportError(f"cannot tell the task kind of {cls!r} (targets {targets}); valid kinds: {', '.join(KINDS)}")


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` of a Lightning checkpoint, errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ExportError(f"{path}: refused by torch.load(weights_only=True) (an object type that is not a plain "
                          f"container or tensor): {err}") from err
    except Exception as err:
        raise ExportError(f"cannot read checkpoint {path} (truncated or not a torch checkpoint?): {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ExportError(f"{path} is not a training checkpoint of train.py (no state_dict / hyper_parameters)")
    return checkpoint


def build_head(head_cfg: dict, channels: Sequence[int], strides: Sequence[int], num_classes: int | None) -> nn.Module:
    """Instantiate a head as ``DenseTask`` does: ``in_channels``/``strides`` from the backbone.

    ``weights`` (the file a training run initialised the head from) is not a constructor argument: left out.
    """
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    head_cfg = {k: v for k, v in head_cfg.items() if k != "weights"}
    return instantiate(head_cfg, in_channels=list(channels), strides=list(strides), **extra)


def _load_backbone_tensors(backbone: nn.Module, state: dict[str, torch.Tensor], source: str, complete: bool) -> None:
    """Load backbone tensors (keys relative to the backbone); unexpected keys always fail, missing ones if ``complete``."""
    expected = backbone.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state)) if complete else []
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if unexpected or missing or wrong:
        raise ExportError(f"{source} does not fit the backbone: unexpected {unexpected[:5]}, missing {missing[:5]}, "
                          f"shape mismatch {wrong[:5]}")
    backbone.load_state_dict(state, strict=False)


def _load_head_tensors(head: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).replace("\n\t", "; ").split())
        raise ExportError(f"{source} does not fit the head built from the config "
                          f"({type(head).__name__}): {detail}") from err


def predictor_from_checkpoint(path: str | Path, device="cpu", kind: str | None = None) -> Predictor:
    """Rebuild the model of a ``train.py`` checkpoint (backbone weights it left out are re-read from their source)."""
    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint["hyper_parameters"])
    if kind is None:
        if "task_class" not in checkpoint:
            raise ExportError(f"{path} does not record its task_class (an older checkpoint): pass kind=...")
        kind = task_kind(checkpoint["task_class"])
    backbone_cfg = _with_defaults(build_backbone, hparams["backbone"])
    head_cfg = dict(hparams["head"])
    backbone = build_backbone(**backbone_cfg)
    head = build_head(head_cfg, backbone.channels, backbone.strides, hparams.get("num_classes"))
    state = checkpoint["state_dict"]
    _load_head_tensors(head, {k[5:]: v for k, v in state.items() if k.startswith("head.")}, f"{path} (head.*)")
    backbone_state = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone_cfg.get("weights") and not backbone_state:
        raise ExportError(f"{path} holds no backbone weights but its backbone is random-init (weights: null)")
    _load_backbone_tensors(backbone, backbone_state, f"{path} (backbone.*)", complete=not backbone_cfg.get("weights"))
    other = sorted(k for k in state if not k.startswith(("head.", "backbone.")))
    if other:
        raise ExportError(f"{path}: state_dict keys outside backbone./head.: {other[:5]}")
    config = {
        "task": {"class": checkpoint.get("task_class"), "kind": kind},
        "backbone": dict(backbone_cfg, out_indices=list(backbone.out_indices)),
        "head": dict(_with_defaults(type(head), head_cfg), in_channels=list(backbone.channels), strides=list(backbone.strides),
                     **({"num_classes": hparams["num_classes"]} if hparams.get("num_classes") is not None else {})),
        "features": {"channels": list(backbone.channels), "strides": list(backbone.strides),
                     "pad_to": int(backbone.pad_to)},
        "num_classes": hparams.get("num_classes"),
        "class_names": hparams.get("class_names"),
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "eval": _eval_settings(hparams),
    }
    return Predictor(DenseModel(backbone, head, kind), kind, hparams.get("num_classes"), hparams.get("class_names"),
                     eval=config["eval"], device=device, config=config)


def _with_defaults(fn, given: dict) -> dict:
    """``given`` plus the default of every other keyword argument of ``fn`` (the resolved call)."""
    resolved = dict(given)
    for name, param in inspect.signature(fn).parameters.items():
        if name not in resolved and param.default is not inspect.Parameter.empty and name not in (
                "in_channels", "strides", "num_classes"):
            default = param.default
            resolved[name] = list(default) if isinstance(default, tuple) else default
    return resolved


def _eval_settings(hparams: dict) -> dict:
    names = {"eval_mode": "mode", "eval_crop": "crop", "eval_stride": "stride", "eval_batch_size": "batch_size",
             "eval_flip": "flip", "eval_small_image": "small_image", "eval_activation": "activation",
             "eval_tta": "tta", "eval_preset": "preset", "eval_stitch": "stitch"}
    settings = {new: hparams[old] for old, new in names.items() if hparams.get(old) is not None}
    if settings.get("preset"):  # a preset replaces the task's own values of the keys it sets (as in validation)
        for key in preset_settings(settings["preset"]):
            settings.pop(key, None)
    return settings


def _get(config: dict, dotted: str, source: Path):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ExportError(f"{source}: missing key '{dotted}'")
        value = value[part]
    return value


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"missing export file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"cannot read {path} (truncated or corrupt?): {err}") from err


def predictor_from_export(folder: str | Path, device="cpu") -> Predictor:
    """Rebuild a model from an export folder (``config.yaml`` + ``head.safetensors`` [+ ``backbone.safetensors``])."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in export folder {folder}")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise ExportError(f"cannot parse {config_path}: {err}") from err
    if not isinstance(config, dict):
        raise ExportError(f"{config_path} does not hold a mapping")
    kind = _get(config, "task.kind", config_path)
    backbone_cfg = dict(_get(config, "backbone", config_path))
    for key in ("name", "weights", "out_indices", "freeze"):
        _get(config, f"backbone.{key}", config_path)
    head_cfg = dict(_get(config, "head", config_path))
    for key in ("_target_", "in_channels", "strides"):
        _get(config, f"head.{key}", config_path)
    files = _get(config, "files", config_path)
    head_file = folder / _get(config, "files.head", config_path)
    backbone_file = files.get("backbone")
    num_classes = config.get("num_classes")
    if kind in ("segmentation", "detection", "classification"):
        num_classes = _get(config, "num_classes", config_path)

    try:
        backbone = build_backbone(**backbone_cfg)
    except TypeError as err:
        raise ExportError(f"{config_path}: bad 'backbone' arguments: {err}") from err
    in_channels, strides = [int(c) for c in head_cfg.pop("in_channels")], [int(s) for s in head_cfg.pop("strides")]
    if in_channels != list(backbone.channels) or strides != list(backbone.strides):
        raise ExportError(f"{config_path}: backbone {backbone_cfg['name']!r} gives channels {list(backbone.channels)} "
                          f"at strides {list(backbone.strides)}, but the head was trained on 'head.in_channels' "
                          f"{in_channels} at 'head.strides' {strides}")
    head_classes = head_cfg.pop("num_classes", None)
    if num_classes is not None and head_classes is not None and int(head_classes) != int(num_classes):
        raise ExportError(f"{config_path}: 'head.num_classes' {head_classes} != 'num_classes' {num_classes}")
    try:
        head = build_head(head_cfg, backbone.channels, backbone.strides, num_classes)
    except InstantiationException as err:
        raise ExportError(f"{config_path}: cannot build 'head' {head_cfg.get('_target_')!r} from its arguments "
                          f"(does 'head._target_' name the head that {head_file.name} was trained with?): "
                          f"{err.__cause__ or err}") from err
    _load_head_tensors(head, _read_tensors(head_file), str(head_file))
    if backbone_file:
        path = folder / backbone_file
        _load_backbone_tensors(backbone, _read_tensors(path), str(path), complete=not backbone_cfg.get("weights"))
    elif not backbone_cfg.get("weights"):
        raise ExportError(f"{config_path}: the backbone is random-init ('backbone.weights' is null) but "
                          f"'files.backbone' names no {BACKBONE_FILE}")
    normalize_cfg = config.get("normalize") or {}
    return Predictor(DenseModel(backbone, head, kind), kind, num_classes, config.get("class_names"),
                     mean=normalize_cfg.get("mean", IMAGENET_MEAN), std=normalize_cfg.get("std", IMAGENET_STD),
                     eval=config.get("eval"), device=device, config=config)


def load_predictor(path: str | Path, device: str | torch.device = "cpu", kind: str | None = None,
                   backbone: str | None = None, backbone_weights: str | None = None) -> Predictor:
    """Load a ``train.py`` checkpoint (``.ckpt``), an export folder (from ``export.py``) or one of Meta's released
    head files (with ``backbone`` = a backbone name and ``backbone_weights`` = its weights source) as a ``Predictor``.

    Example::

        predictor = load_predictor("outputs/.../checkpoints/last.ckpt", device="cuda")
        result = predictor.predict("photo.jpg", mode="slide", crop=512, stride=341, tta={"flip": True})
        result["labels"]  # (H, W) class ids at the photo's size
    """
    path = Path(path)
    if backbone is not None:
        from .meta_heads import predictor_from_meta

        return predictor_from_meta(path, backbone, backbone_weights, device)
    if path.is_dir() or path.name == CONFIG_FILE:
        return predictor_from_export(path if path.is_dir() else path.parent, device)
    return predictor_from_checkpoint(path, device, kind)
