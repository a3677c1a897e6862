"""Meta's linear head files -> ``LinearClassifier`` / ``LinearSegHead`` (formats for ``tasks.meta_heads``).

- Classifier (hub ``dinov3_vit7b16_lc``, ``dinov3_vit7b16_imagenet1k_linear_head-*.pth``): the state dict of
  ``nn.Linear(2 * embed_dim, K)`` (``weight`` ``(K, 2D)``, ``bias`` ``(K,)``) applied to the concatenation of the
  last layer's class token and its mean patch token, both after the final norm: our ``LinearClassifier`` with
  ``n_last_blocks=1``, ``avgpool=True`` on the last layer, key ``linear.*``.
- Linear segmentation (``model_final.pth`` of Meta's ``dinov3/eval/segmentation`` training, ``{"model": ...}``):
  ``segmentation_model.1.batchnorm_layer.*`` (BatchNorm over the concatenated layers) and
  ``segmentation_model.1.conv.*`` (1x1 conv to K classes): our ``LinearSegHead`` keys ``batchnorm.*``, ``conv.*``.
  One layer of width D is Meta's ``LAST``; ``4 D`` is ``FOUR_EVEN_INTERVALS`` (the backbone's default layers).

Sizes are read from the shapes; a file made for a backbone of another width fails naming the file and both widths.
"""

from __future__ import annotations

import functools

import timm
import torch

from backbones.registry import BACKBONES, BackboneSpec
from dense_data.ade20k import CLASS_NAMES as ADE20K_CLASSES
from tasks.meta_heads import MetaFormat, MetaHead
from tasks.predictor import ExportError

SEG_PREFIX = "segmentation_model.1."
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
SEG_KEYS = {f"{SEG_PREFIX}batchnorm_layer.{k}" for k in _BN} | {f"{SEG_PREFIX}conv.weight", f"{SEG_PREFIX}conv.bias"}


def backbone_width(spec: BackboneSpec) -> int:
    """Channels of the backbone's last layer (ViT embed dim, ConvNeXt last stage), from a model on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.overrides)
    return int(model.num_features)


@functools.cache
def _named_width(name: str) -> int:
    return backbone_width(BACKBONES[name])


def _backbones_of_width(width: int) -> str:
    """Our backbone names of that width (for error messages; the first call builds each on the meta device, ~5 s)."""
    names = [name for name in BACKBONES if not name.endswith("_test") and _named_width(name) == width]
    return ", ".join(names) or "none of ours"


def imagenet_class_names() -> list[str]:
    """The ImageNet-1k class names in label order (timm's synset table, first synonym of each)."""
    from timm.data import ImageNetInfo

    return [text.split(",")[0].strip() for text in ImageNetInfo("imagenet-1k").label_descriptions()]


# ---------------------------------------------------------------------------------------------- classifier
def is_classifier(state: dict[str, torch.Tensor]) -> bool:
    return set(state) == {"weight", "bias"} and state["weight"].ndim == 2 and state["bias"].ndim == 1


def convert_classifier(state: dict[str, torch.Tensor], spec: BackboneSpec, source: str) -> MetaHead:
    weight, bias = state["weight"], state["bias"]
    num_classes, width = weight.shape
    if bias.shape[0] != num_classes:
        raise ExportError(f"{source}: Meta linear classifier with weight {tuple(weight.shape)} but bias "
                          f"{tuple(bias.shape)}")
    if spec.kind != "vit":
        raise ExportError(f"{source}: Meta's linear classifier reads a class token and the mean patch token of a ViT; "
                          f"the backbone {spec.arch} ({spec.kind}) has no class token")
    dim = backbone_width(spec)
    if width != 2 * dim:
        raise ExportError(
            f"{source}: Meta's linear classifier reads [class token, mean patch token] = 2 x {dim} = {2 * dim} "
            f"features on this backbone ({spec.arch}), but its weight is {tuple(weight.shape)}: made for a backbone "
            f"of width {width / 2:g} ({_backbones_of_width(width // 2) if width % 2 == 0 else 'none'})")
    return MetaHead(
        kind="classification",
        head={"_target_": "heads.LinearClassifier", "n_last_blocks": 1, "avgpool": True, "use_cls": True},
        state={"linear.weight": weight, "linear.bias": bias},
        out_indices=[spec.depth - 1],
        num_classes=int(num_classes),
        class_names=imagenet_class_names() if num_classes == 1000 else None,
        eval={"mode": "whole"},
    )


CLASSIFIER_FORMAT = MetaFormat("meta_linear_classifier", is_classifier, convert_classifier)


# ---------------------------------------------------------------------------------------- segmentation
def is_linear_seg(state: dict[str, torch.Tensor]) -> bool:
    return f"{SEG_PREFIX}conv.weight" in state and set(state) <= SEG_KEYS


def convert_linear_seg(state: dict[str, torch.Tensor], spec: BackboneSpec, source: str) -> MetaHead:
    missing = sorted(k for k in SEG_KEYS - set(state) if not k.endswith("num_batches_tracked"))
    if missing:
        raise ExportError(f"{source}: Meta linear segmentation head without {missing} (use_batchnorm=False?); "
                          "our LinearSegHead always has the BatchNorm")
    conv = state[f"{SEG_PREFIX}conv.weight"]
    if conv.ndim != 4 or conv.shape[-2:] != (1, 1):
        raise ExportError(f"{source}: {SEG_PREFIX}conv.weight is {tuple(conv.shape)}, expected (K, C, 1, 1)")
    num_classes, channels = int(conv.shape[0]), int(conv.shape[1])
    dim = backbone_width(spec)
    if channels == dim:
        out_indices = [spec.depth - 1]
    elif channels == 4 * dim and spec.kind == "vit":
        out_indices = list(spec.out_indices)
    else:
        raise ExportError(
            f"{source}: Meta linear segmentation head over {channels} channels, but the backbone {spec.arch} gives "
            f"{dim} per layer (expected {dim} for its last layer or {4 * dim} for four layers); made for a backbone "
            f"of width {channels} ({_backbones_of_width(channels)}) or {channels / 4:g} x 4")
    ours = {"batchnorm": f"{SEG_PREFIX}batchnorm_layer.", "conv": f"{SEG_PREFIX}conv."}
    converted = {f"{name}.{key[len(prefix):]}": value for name, prefix in ours.items()
                 for key, value in state.items() if key.startswith(prefix)}
    converted.setdefault("batchnorm.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return MetaHead(kind="segmentation", head={"_target_": "heads.LinearSegHead", "dropout": 0.1}, state=converted,
                    out_indices=out_indices, num_classes=num_classes,
                    class_names=list(ADE20K_CLASSES) if num_classes == len(ADE20K_CLASSES) else None,
                    eval={"preset": "meta_linear"})


LINEAR_SEG_FORMAT = MetaFormat("meta_linear_seg", is_linear_seg, convert_linear_seg)
