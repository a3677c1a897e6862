"""DPT depth head (Ranftl et al., "Vision Transformers for Dense Prediction") for multi-layer backbone features.

Pipeline, for 4 backbone layers (shallow -> deep)::

    Reassemble_i : readout (ViT cls token: ignore / add / project) -> [BatchNorm] -> 1x1 conv to post_channels[i]
                   -> resize to stride 4 / 8 / 16 / 32 (ConvTranspose for up, identity, strided 3x3 conv for down)
                   -> 3x3 conv to `features`
    Fusion       : 4 RefineNet blocks with pre-activation residual conv units, coarse (1/32) to fine,
                   each upsampling x2 (or to the next level's grid); the last ends at stride 2
                   -> [3x3 conv + ReLU]
    Head         : 3x3 conv (F -> F/2) -> bilinear x2 (or to the input size) -> 3x3 conv (-> hidden) -> ReLU -> 1x1 conv
    Output       : "regression": 1 channel, ReLU + min_depth  or  sigmoid * max_depth
                   "bins": `num_bins` logits mixed AdaBins-style (``heads.ops.depth_bins``)

The defaults are Meta's DPT as its dinov3 depther builds it (``dinov3/eval/depth/models/dpt_head.py`` + its
``FeaturesToDepth``): BatchNorm before each projection, bias-free residual convs, x2 fusion upsampling with a
resized skip, the post-fusion 3x3 conv + ReLU, bins ``linspace(min, max, K)`` weighted by normalised
``relu(x) + 0.1``, and centre padding of the input (``input_padding``, applied by ``DenseModel``). Each is a
constructor value; ``conf/head/dpt.yaml`` lists them.

ViT features (all strides 16) are turned into a pyramid by the resize step; ConvNeXt features (strides 4/8/16/32)
only get the projections (the resize is the identity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.features import Features
from heads.depth_losses import DepthCriterion
from heads.ops.depth_bins import BinsToDepth, bin_centres
from heads.ops.ms_deform_attn import as_size

from .fusion import UPSAMPLE_MODES, FeatureFusionBlock
from .reassemble import Reassemble

TARGET_STRIDES = (4, 8, 16, 32)
PADDINGS = ("center", "corner")

__all__ = ["DPTHead", "bin_centres", "default_features"]


def default_features(width: int) -> int:
    """Fusion width that scales with the backbone width: 64 (<=384), 128 (<=768), 256 above."""
    if width <= 384:
        return 64
    if width <= 768:
        return 128
    return 256


class DPTHead(nn.Module):
    """DPT depth head.

    Args:
        in_channels: ``C_i`` of the 4 backbone maps (shallow -> deep).
        strides: their strides: ``(16, 16, 16, 16)`` for a ViT, ``(4, 8, 16, 32)`` for a ConvNeXt.
        readout: how the ViT class token enters: "ignore", "add", or "project" (concat + Linear + GELU).
            Must be "ignore" for backbones without class tokens (strides not all equal).
        features: fusion width F; default from :func:`default_features` of ``max(in_channels)``.
        post_channels: per-layer widths after the 1x1 projection; default ``[C/8, C/4, C/2, C]`` for a ViT
            (Depth-Anything-V2's choice for ViT-S/B) and ``in_channels`` for a multi-scale backbone; ``"meta"``:
            ``[min(C, 2048)] * 4``, the widths of Meta's released depthers (ViT-L: 1024, ViT-7B: 2048).
        output: "regression" (1 channel) or "bins" (``num_bins`` logits mixed AdaBins-style).
        activation: regression only: "relu" (``relu(x) + min_depth``) or "sigmoid" (``sigmoid(x) * max_depth``).
        num_bins, bin_spacing, bin_placement, bin_norm: bins output, see ``heads.ops.depth_bins``
            (Meta: ``linspace`` placement, ``linear`` norm; ours before: ``midpoints`` + ``softmax``).
        min_depth, max_depth: valid depth range in metres (targets outside it are ignored by the loss).
        silog_lambda, silog_unbiased, silog_warmup: SiLog loss (Meta: 0.15, N-1 variance, 100 warm-up iterations).
        grad_weight: weight of the gradient matching loss; 0 disables it.
        head_hidden: channels of the last 3x3 conv of the upsampling head.
        batchnorm: BatchNorm on each layer before its projection (Meta's ``use_batchnorm``).
        residual_bias: biases in the residual conv units (Meta's released DPT: none; its CHMv2 head: yes).
        fusion_conv: the 3x3 conv + ReLU after the last fusion block (Meta's ``projection_after_fusion``).
        fusion_upsample: ``x2`` (Meta) or ``to_skip`` (every level keeps its grid; see ``FeatureFusionBlock``).
            With ``x2`` the head upsamples x2 to ``32 * ceil(h / 32)`` and the depth is resized bilinearly to
            the input size, as Meta's evaluation resizes its output.
        input_padding: ``center`` (Meta's depther centre-pads the image to the patch multiple) or ``corner``
            (bottom/right, as every other head); ``DenseModel`` reads it.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        readout: str = "ignore",
        features: int | None = None,
        post_channels: Sequence[int] | str | None = None,
        output: str = "regression",
        activation: str = "relu",
        num_bins: int = 256,
        bin_spacing: str = "linear",
        bin_placement: str = "linspace",
        bin_norm: str = "linear",
        min_depth: float = 0.001,
        max_depth: float = 10.0,
        silog_lambda: float = 0.15,
        silog_unbiased: bool = True,
        silog_warmup: int = 100,
        grad_weight: float = 0.0,
        head_hidden: int = 32,
        batchnorm: bool = True,
        residual_bias: bool = False,
        fusion_conv: bool = True,
        fusion_upsample: str = "x2",
        input_padding: str = "center",
    ):
        super().__init__()
        in_channels, strides = list(in_channels), list(strides)
        if len(in_channels) != 4 or len(strides) != 4:
            raise ValueError(f"DPTHead needs exactly 4 layers, got channels {in_channels} and strides {strides}")
        if readout not in ("ignore", "add", "project"):
            raise ValueError(f"readout must be 'ignore', 'add' or 'project', got {readout!r}")
        multi_scale = len(set(strides)) > 1
        if readout != "ignore" and multi_scale:
            raise ValueError(
                f"readout={readout!r} needs ViT class tokens; backbones with strides {strides} (ConvNeXt) have none: "
                "use readout='ignore'"
            )
        if output not in ("regression", "bins"):
            raise ValueError(f"output must be 'regression' or 'bins', got {output!r}")
        if activation not in ("relu", "sigmoid"):
            raise ValueError(f"activation must be 'relu' or 'sigmoid', got {activation!r}")
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        if fusion_upsample not in UPSAMPLE_MODES:
            raise ValueError(f"fusion_upsample must be one of {UPSAMPLE_MODES}, got {fusion_upsample!r}")
        if input_padding not in PADDINGS:
            raise ValueError(f"input_padding must be one of {PADDINGS}, got {input_padding!r}")
        width = max(in_channels)
        features = int(features) if features is not None else default_features(width)
        if post_channels == "meta":
            post_channels = [min(c, 2048) for c in in_channels]
        elif isinstance(post_channels, str):
            raise ValueError(f"post_channels must be a list of 4 widths, null or 'meta', got {post_channels!r}")
        if post_channels is None:
            post_channels = in_channels if multi_scale else [max(c // d, 1) for c, d in zip(in_channels, (8, 4, 2, 1))]
        post_channels = list(post_channels)
        if len(post_channels) != 4:
            raise ValueError(f"post_channels needs 4 values, got {post_channels}")

        self.in_channels, self.strides, self.readout = in_channels, strides, readout
        self.features, self.post_channels = features, post_channels
        self.output, self.activation = output, activation
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.fusion_upsample, self.input_padding = fusion_upsample, input_padding

        self.reassemble = nn.ModuleList(
            Reassemble(c, p, features, s, t, readout, batchnorm)
            for c, p, s, t in zip(in_channels, post_channels, strides, TARGET_STRIDES)
        )
        # fusion[0] is the finest (stride 4) block, fusion[3] the coarsest (no skip).
        self.fusion = nn.ModuleList(
            FeatureFusionBlock(features, has_skip=i < 3, upsample=fusion_upsample, bias=residual_bias)
            for i in range(4)
        )
        self.fusion_conv = nn.Conv2d(features, features, 3, padding=1) if fusion_conv else None
        out_channels = num_bins if output == "bins" else 1
        self.head_conv1 = nn.Conv2d(features, max(features // 2, 1), 3, padding=1)
        self.head_conv2 = nn.Conv2d(max(features // 2, 1), head_hidden, 3, padding=1)
        self.head_out = nn.Conv2d(head_hidden, out_channels, 1)
        if output == "regression" and activation == "relu":
            # start every pixel well inside the ReLU's live zone (1 m): a random bias can leave them all dead.
            nn.init.constant_(self.head_out.bias, 1.0)
        self.to_depth = (BinsToDepth(num_bins, min_depth, max_depth, bin_spacing, bin_placement, bin_norm)
                         if output == "bins" else None)
        self.criterion = DepthCriterion(min_depth, max_depth, silog_lambda, silog_unbiased, silog_warmup, grad_weight)

    # ------------------------------------------------------------------ forward
    def bins_to_depth(self, logits: Tensor) -> Tensor:
        """``(B, K, H, W)`` bin logits -> ``(B, 1, H, W)`` depth (see ``heads.ops.depth_bins``)."""
        return self.to_depth(logits)

    def logits_to_depth(self, x: Tensor) -> Tensor:
        """Raw head output ``(B, K, h, w)`` -> depth ``(B, 1, h, w)`` in >= float32."""
        if self.output == "bins":
            return self.bins_to_depth(x)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.activation == "relu":
            return F.relu(x) + self.min_depth
        return torch.sigmoid(x) * self.max_depth

    def decode(self, features: Features) -> Tensor:
        """The 4 maps -> reassemble, fusion [, fusion conv], the head's first conv: ``(B, F/2, h, w)`` at stride 2
        (``x2`` fusion on a ViT: ``h = 16 * ceil(h16 / 2)``)."""
        maps = list(features.maps)
        if len(maps) != 4:
            raise ValueError(f"DPTHead needs 4 feature maps, got {len(maps)}")
        cls = features.cls if self.readout != "ignore" else None
        if self.readout != "ignore" and cls is None:
            raise ValueError(f"readout={self.readout!r} needs class tokens, but features.cls is None")
        levels = [r(m, None if cls is None else cls[i]) for i, (r, m) in enumerate(zip(self.reassemble, maps))]
        x = self.fusion[3](levels[3], None, size=levels[2].shape[-2:])
        x = self.fusion[2](x, levels[2], size=levels[1].shape[-2:])
        x = self.fusion[1](x, levels[1], size=levels[0].shape[-2:])
        h4, w4 = levels[0].shape[-2:]
        x = self.fusion[0](x, levels[0], size=(2 * h4, 2 * w4))  # stride 2
        if self.fusion_conv is not None:
            x = F.relu(self.fusion_conv(x))
        return self.head_conv1(x)

    def forward(self, features: Features, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """features: 4 maps ``(B, C_i, h_i, w_i)`` -> ``{"depth": (B, 1, H, W)[, "logits": (B, K, h, w)]}``.

        The maps cover ``features.padded_size`` when it is set; the depth is brought to that size and its
        top-left ``image_size`` corner is returned, so ``image_size`` smaller than the padded size crops padding.
        ``x2`` fusion: logits at the head's own size, depth from them, then resized (bilinear) to the padded size.
        """
        H, W = as_size(image_size[0]), as_size(image_size[1])
        ph, pw = (as_size(v) for v in (features.padded_size or (0, 0)))
        full = (ph, pw) if ph >= H and pw >= W and ph > 0 else (H, W)
        x = self.decode(features)
        if self.fusion_upsample == "x2":
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
            logits = self.head_out(F.relu(self.head_conv2(x)))
            depth = self.logits_to_depth(logits)
            # the same size gives the identity: no shape test, so it traces (ONNX)
            depth = F.interpolate(depth, size=full, mode="bilinear", align_corners=False)[..., :H, :W]
        else:
            x = F.interpolate(x, size=full, mode="bilinear", align_corners=True)
            logits = self.head_out(F.relu(self.head_conv2(x)))[..., :H, :W]
            depth = self.logits_to_depth(logits)
        return {"depth": depth, "logits": logits} if self.output == "bins" else {"depth": depth}

    # --------------------------------------------------------------------- loss
    def valid_mask(self, gt: Tensor) -> Tensor:
        """``(B, H, W)`` metres -> bool mask of finite depths in ``[min_depth, max_depth]`` (0 is invalid)."""
        return self.criterion.valid_mask(gt)

    def loss(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """outputs["depth"] ``(B, 1, H, W)``, targets["depth"] ``(B, H, W)`` metres, 0 = invalid.

        Returns ``{"loss_silog": ...}`` plus ``"loss_grad"`` (already multiplied by ``grad_weight``) when enabled.
        """
        return self.criterion(outputs, targets)

    def predict(self, outputs: dict[str, Tensor], image_size: tuple[int, int]) -> Tensor:
        """Depth ``(B, 1, H, W)`` in metres at ``image_size``."""
        depth = outputs["depth"]
        size = (as_size(image_size[0]), as_size(image_size[1]))
        if tuple(depth.shape[-2:]) != size:
            depth = F.interpolate(depth, size=size, mode="bilinear", align_corners=False)
        return depth
