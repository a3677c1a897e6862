"""A DINOv3 backbone (timm ViT or ConvNeXt) that returns multi-layer ``Features``."""

import torch
import torch.nn.functional as F
import timm
from torch import nn

from .adaptation import apply_freeze
from .features import Features
from .windows import windowed_maps
from .registry import get_spec
from .rope import make_rope_traceable
from .weights import load_into, read_state_dict, resolve_weights, to_timm_keys


class DinoBackbone(nn.Module):
    """Wraps a timm DINOv3 model; ``forward(images (B, 3, H, W)) -> Features``.

    Inputs whose sides are not a multiple of the backbone's stride are zero-padded at the bottom and
    right (never cropped); ``Features.padded_size`` says what the maps cover. ViT maps come out of the
    final LayerNorm, as in Meta's evaluations. A ``frozen`` backbone stays in eval mode even when its
    parent is put in train mode. ``windows = n > 0`` (ViT only) extracts the maps as Meta's detector does
    (``backbones.windows``): the layers of a resized global view, then those of ``n x n`` windows (``2 L`` maps).
    """

    def __init__(self, model: nn.Module, kind: str, out_indices: list[int], freeze: str, windows: int = 0):
        super().__init__()
        if windows and kind != "vit":
            raise ValueError(f"windows={windows} needs a ViT backbone, got {kind}")
        self.model = model
        self.kind = kind
        self.out_indices = list(out_indices)
        self.freeze = freeze
        self.windows = windows
        if kind == "vit":
            self.patch_size = model.patch_embed.patch_size[0]
            self.strides = [self.patch_size] * len(out_indices)
            self.channels = [model.embed_dim] * len(out_indices)
            self.pad_to = self.patch_size
        else:
            info = model.feature_info
            self.patch_size = info[0]["reduction"]
            self.strides = [info[i]["reduction"] for i in out_indices]
            self.channels = [info[i]["num_chs"] for i in out_indices]
            self.pad_to = max(self.strides)
        self.embed_dim = self.channels[-1]
        if windows:
            self.strides, self.channels = self.strides * 2, self.channels * 2
        if freeze == "frozen":
            self.eval()

    def train(self, mode: bool = True):
        return super().train(mode and self.freeze != "frozen")

    def forward(self, images: torch.Tensor) -> Features:
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.pad_to, (-width) % self.pad_to
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze != "frozen"):
            if self.kind == "vit" and self.windows:
                maps = windowed_maps(lambda x: [m for m, _ in self._vit_layers(x)], images, self.windows,
                                     self.patch_size)
                cls = None
            elif self.kind == "vit":
                outputs = self._vit_layers(images)
                maps = [spatial for spatial, _ in outputs]
                cls = [prefix[:, 0] for _, prefix in outputs]
            else:
                maps = self.model.forward_intermediates(images, indices=self.out_indices, intermediates_only=True)
                cls = None
        return Features(maps=maps, cls=cls, strides=self.strides, channels=self.channels,
                        patch_size=self.patch_size, padded_size=(height + pad_h, width + pad_w), images=images)

    def _vit_layers(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(map (B, C, h, w), prefix tokens (B, P, C))`` of every ``out_indices`` layer, after the final norm."""
        return self.model.forward_intermediates(images, indices=self.out_indices, norm=True,
                                                return_prefix_tokens=True, intermediates_only=True)


def build_backbone(name: str, weights: str | None = None, out_indices: list[int] | None = None,
                   freeze: str = "frozen", last_n: int = 0, lora_rank: int = 8, lora_alpha: float = 16.0,
                   drop_path_rate: float = 0.0, windows: int = 0) -> DinoBackbone:
    """Build a DINOv3 backbone by name.

    Args:
        name: ``vits16``, ``vits16plus``, ``vitb16``, ``vitl16``, ``vith16plus``, ``vit7b16``,
            ``convnext_tiny|small|base|large``, or the random-init miniatures ``vit_test`` / ``convnext_test``.
        weights: ``None`` (random init), ``"timm"``, ``"hf"``, a timm tag, a hub id or a local file/folder in
            Meta's, timm's or Hugging Face's format (see ``backbones.weights.resolve_weights``).
        out_indices: layers to return; default: Meta's four layers for the model's depth (ConvNeXt: 4 stages).
        freeze: ``frozen`` | ``last_n`` | ``all`` | ``lora``.
        windows: ``n > 0``: Meta's detector features, ``n x n`` windows + a resized global view (ViT only).
    """
    spec = get_spec(name)
    indices = list(spec.out_indices if out_indices is None else out_indices)
    bad = [i for i in indices if not -spec.depth <= i < spec.depth]
    if bad:
        raise ValueError(f"out_indices {bad} out of range for {name} with {spec.depth} "
                         f"{'blocks' if spec.kind == 'vit' else 'stages'}")
    indices = [i % spec.depth for i in indices]
    kwargs = dict(spec.overrides, num_classes=0, drop_path_rate=drop_path_rate)
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    make_rope_traceable(model)  # RoPE grids follow the input size in exported graphs
    if weights:
        path = resolve_weights(str(weights), spec)
        load_into(model, to_timm_keys(read_state_dict(path), model, spec.kind), str(path))
    apply_freeze(model, freeze, spec.kind, last_n, lora_rank, lora_alpha)
    return DinoBackbone(model, spec.kind, indices, freeze, windows)
