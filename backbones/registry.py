"""The DINOv3 backbones we know by name, and what timm calls them."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone.

    Attributes:
        arch: timm model name.
        kind: ``"vit"`` or ``"convnext"``.
        depth: number of ViT blocks, or ConvNeXt stages.
        out_indices: default layers for multi-layer heads (Meta's choice for this depth).
        timm_tag: pretrained tag on timm's hub, used when ``weights="timm"``.
        hf_id: Hugging Face id of Meta's weights in ``transformers`` format.
        overrides: constructor arguments that make a shrunken test model.
    """

    arch: str
    kind: str
    depth: int
    out_indices: tuple[int, ...]
    timm_tag: str | None = None
    hf_id: str | None = None
    overrides: dict = field(default_factory=dict)


def _vit(arch: str, depth: int, out_indices, hf: str | None, tag="lvd1689m", **overrides) -> BackboneSpec:
    hf_id = f"facebook/dinov3-{hf}-pretrain-lvd1689m" if hf else None
    return BackboneSpec(arch, "vit", depth, tuple(out_indices), tag, hf_id, overrides)


def _convnext(size: str, **overrides) -> BackboneSpec:
    hf_id = f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m"
    return BackboneSpec(f"convnext_{size}", "convnext", 4, (0, 1, 2, 3), "dinov3_lvd1689m", hf_id, overrides)


BACKBONES: dict[str, BackboneSpec] = {
    "vits16": _vit("vit_small_patch16_dinov3_qkvb", 12, (2, 5, 8, 11), "vits16"),
    "vits16plus": _vit("vit_small_plus_patch16_dinov3_qkvb", 12, (2, 5, 8, 11), "vits16plus"),
    "vitb16": _vit("vit_base_patch16_dinov3_qkvb", 12, (2, 5, 8, 11), "vitb16"),
    "vitl16": _vit("vit_large_patch16_dinov3_qkvb", 24, (4, 11, 17, 23), "vitl16"),
    "vith16plus": _vit("vit_huge_plus_patch16_dinov3_qkvb", 32, (7, 15, 23, 31), "vith16plus"),
    "vit7b16": _vit("vit_7b_patch16_dinov3", 40, (9, 19, 29, 39), "vit7b16"),
    "convnext_tiny": _convnext("tiny"),
    "convnext_small": _convnext("small"),
    "convnext_base": _convnext("base"),
    "convnext_large": _convnext("large"),
    # Random-init miniatures for tests and the CPU demo: same code paths, a few thousand times smaller.
    "vit_test": BackboneSpec("vit_small_patch16_dinov3_qkvb", "vit", 4, (0, 1, 2, 3), None, None,
                             dict(embed_dim=64, depth=4, num_heads=2)),
    "convnext_test": BackboneSpec("convnext_tiny", "convnext", 4, (0, 1, 2, 3), None, None,
                                  dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))),
}


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name; an unknown name lists the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name]
