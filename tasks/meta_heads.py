"""Meta's released head files: recognise the format from the keys, convert, and build a ``Predictor``.

Meta publishes heads without their backbone (``dinov3_vit7b16_ms`` segmentor, ``_lc`` classifier, ``_dd`` depther,
``_de`` detector). Each head family keeps its converter beside it (a key map, sizes read from shapes) and exposes
one ``MetaFormat``; this module only reads the file, asks each format whether the keys are its own, and builds
backbone + head from what the converter returns. It holds no key maps.

Usage::

    predictor = load_predictor("dinov3_vit7b16_ade20k_m2f_head.pth", backbone="vit7b16", backbone_weights="timm")
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import get_class

from backbones import build_backbone
from backbones.registry import get_spec
from dense_data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .loading import _load_head_tensors, _with_defaults, build_head
from .predictor import DenseModel, ExportError, Predictor


@dataclass
class MetaHead:
    """What a converter makes of one of Meta's head files.

    Attributes:
        kind: ``segmentation`` | ``depth`` | ``detection`` | ``classification``.
        head: the head's config, ``_target_`` plus constructor arguments (without ``in_channels`` / ``strides`` /
            ``num_classes``): what ``build_head`` instantiates and what ``export.py`` writes.
        state: the head's state dict in our key names.
        out_indices: the backbone layers the head reads (Meta's choice for this backbone's depth).
        num_classes, class_names: label space (None for depth).
        eval: ``Predictor`` eval defaults (Meta's evaluation of the released head).
        backbone_args: further ``build_backbone`` arguments the head needs (e.g. ``windows`` for the detector).
    """

    kind: str
    head: dict
    state: dict[str, torch.Tensor]
    out_indices: list[int]
    num_classes: int | None = None
    class_names: list[str] | None = None
    eval: dict = field(default_factory=dict)
    backbone_args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MetaFormat:
    """One released file format: ``matches(state)`` says whether the keys are this format's; ``convert(state,
    spec, source)`` returns a ``MetaHead`` for a backbone described by ``spec`` (a ``BackboneSpec``) or raises
    ``ExportError`` naming ``source`` and what was expected."""

    name: str
    matches: Callable[[dict[str, torch.Tensor]], bool]
    convert: Callable[..., MetaHead]


# Where each head family's format lives ("module:attribute"); a family adds its line here.
FORMATS: tuple[str, ...] = (
    "heads.mask2former.meta_checkpoint:META_SEGMENTOR",
    "heads.linear_meta:CLASSIFIER_FORMAT",
    "heads.linear_meta:LINEAR_SEG_FORMAT",
    "heads.dpt.meta_checkpoint:DEPTHER",
    "heads.dpt.meta_checkpoint:CHMV2",
    "heads.detr.meta_checkpoint:META_DETECTOR",
)


def formats() -> list[MetaFormat]:
    found = []
    for ref in FORMATS:
        module, _, name = ref.partition(":")
        found.append(getattr(importlib.import_module(module), name))
    return found


def read_meta_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Meta head file (``torch.load(weights_only=True)``); ``{"model": sd}`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ExportError(f"{path}: refused by torch.load(weights_only=True): {err}") from err
    except Exception as err:
        raise ExportError(f"cannot read {path} (truncated or not a torch file?): {err}") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path} is not a state dict of tensors (nor {{'model': state_dict}})")
    return obj


def detect_format(state: dict[str, torch.Tensor], source: str | Path) -> MetaFormat:
    for fmt in formats():
        if fmt.matches(state):
            return fmt
    known = ", ".join(f.name for f in formats()) or "none registered"
    raise ExportError(f"{source}: keys {sorted(state)[:6]} match none of Meta's released head formats ({known})")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    return a == b


def load_head_weights(head: torch.nn.Module, head_cfg: dict, path: str | Path, backbone: str,
                      out_indices: list[int], num_classes: int | None = None,
                      backbone_args: dict | None = None) -> str:
    """Initialise ``head`` (built from ``head_cfg``) from a head file: the ``head.weights=PATH`` of a training config.

    ``PATH`` is a ``head.safetensors`` written by ``export.py``, or one of Meta's released head files, converted
    for the backbone named ``backbone`` as ``load_predictor`` does. A Meta file must agree with the run: its layers
    are the backbone's ``out_indices``, its classes ``num_classes``, its head class and sizes those of the config,
    or an ``ExportError`` names the file and the config key to change. ``backbone_args``: the run's further
    backbone values (e.g. ``{"windows": 0}``), each checked against the file's (the detector needs 3 x 3 windows).
    Loads strictly; returns the format's name.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from .loading import _read_tensors

        _load_head_tensors(head, _read_tensors(path), str(path))
        return "safetensors"
    state = read_meta_file(path)
    fmt = detect_format(state, path)
    spec = get_spec(backbone)
    meta = fmt.convert(state, spec, str(path))
    wanted = [i % spec.depth for i in meta.out_indices]
    if wanted != [i % spec.depth for i in out_indices]:
        raise ExportError(f"{path} ({fmt.name}) reads layers {wanted} of {backbone}, but the backbone gives "
                          f"{list(out_indices)}: set backbone.out_indices={wanted}")
    for key, value in meta.backbone_args.items():
        if backbone_args is not None and key in backbone_args and backbone_args[key] != value:
            raise ExportError(f"{path} ({fmt.name}) needs backbone.{key}={value!r}, but the backbone has "
                              f"{key}={backbone_args[key]!r}: set backbone.{key}={value!r}")
    if meta.num_classes is not None and num_classes is not None and meta.num_classes != num_classes:
        raise ExportError(f"{path} ({fmt.name}) predicts {meta.num_classes} classes, the data has {num_classes}")
    target = get_class(meta.head["_target_"])
    if not isinstance(head, target):
        raise ExportError(f"{path} ({fmt.name}) holds a {target.__name__}, but the config builds a "
                          f"{type(head).__name__}: choose the head of that family (head._target_)")
    resolved = _with_defaults(type(head), head_cfg)
    wrong = [f"head.{k}={resolved[k]!r} (the file: {v!r})" for k, v in meta.head.items()
             if k != "_target_" and k in resolved and not _same(resolved[k], v)]
    if wrong:
        raise ExportError(f"{path} ({fmt.name}) does not fit the head config: {', '.join(wrong)}: set those values")
    _load_head_tensors(head, meta.state, f"{path} ({fmt.name})")
    return fmt.name


def predictor_from_meta(path: str | Path, backbone: str, backbone_weights: str | None, device="cpu",
                        freeze: str = "frozen") -> Predictor:
    """Build a ``Predictor`` from one of Meta's head files on the named backbone (weights from ``backbone_weights``)."""
    state = read_meta_file(path)
    fmt = detect_format(state, path)
    spec = get_spec(backbone)
    meta = fmt.convert(state, spec, str(path))
    backbone_cfg = _with_defaults(build_backbone, {"name": backbone, "weights": backbone_weights,
                                                   "out_indices": list(meta.out_indices), "freeze": freeze,
                                                   **meta.backbone_args})
    net = build_backbone(**backbone_cfg)
    head = build_head(meta.head, net.channels, net.strides, meta.num_classes)
    _load_head_tensors(head, meta.state, f"{path} ({fmt.name})")
    config = {
        "task": {"class": None, "kind": meta.kind, "meta_format": fmt.name, "source": str(path)},
        "backbone": dict(backbone_cfg, out_indices=list(net.out_indices)),
        "head": dict(_with_defaults(type(head), meta.head), in_channels=list(net.channels), strides=list(net.strides),
                     **({"num_classes": meta.num_classes} if meta.num_classes is not None else {})),
        "features": {"channels": list(net.channels), "strides": list(net.strides), "pad_to": int(net.pad_to)},
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "eval": dict(meta.eval),
    }
    return Predictor(DenseModel(net, head, meta.kind), meta.kind, meta.num_classes, meta.class_names,
                     eval=config["eval"], device=device, config=config)
