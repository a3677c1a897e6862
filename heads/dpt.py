"""DPT depth head (Ranftl et al., "Vision Transformers for Dense Prediction") for multi-layer backbone features.

Pipeline, for 4 backbone layers (shallow -> deep)::

    Reassemble_i : readout (ViT cls token: ignore / add / project) -> 1x1 conv to post_channels[i]
                   -> resize to stride 4 / 8 / 16 / 32 (ConvTranspose for up, identity, strided 3x3 conv for down)
                   -> 3x3 conv to `features`
    Fusion       : 4 RefineNet blocks with pre-activation residual conv units, coarse (1/32) to fine,
                   each upsampling to the next finer level; the last ends at stride 2.
    Head         : 3x3 conv (F -> F/2) -> bilinear up to full resolution -> 3x3 conv (-> 32) -> ReLU -> 1x1 conv
    Output       : "regression": 1 channel, ReLU + min_depth  or  sigmoid * max_depth
                   "bins": `num_bins` logits, softmax over bins, depth = sum_k p_k * centre_k (AdaBins-style)

ViT features (all strides 16) are turned into a pyramid by the resize step; ConvNeXt features (strides 4/8/16/32)
only get the projections (the resize is the identity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.features import Features
from heads.depth_losses import GradientMatchingLoss, SiLogLoss
from heads.ops.ms_deform_attn import as_size

TARGET_STRIDES = (4, 8, 16, 32)


def default_features(width: int) -> int:
    """Fusion width that scales with the backbone width: 64 (<=384), 128 (<=768), 256 above."""
    if width <= 384:
        return 64
    if width <= 768:
        return 128
    return 256


def bin_centres(num_bins: int, min_depth: float, max_depth: float, spacing: str = "linear") -> Tensor:
    """Centres ``(num_bins,)`` of bins that split ``[min_depth, max_depth]`` evenly in depth or in log depth.

    linear: edges ``linspace(min, max, K+1)``, centre = arithmetic mean of its two edges.
    log:    edges ``exp(linspace(log min, log max, K+1))``, centre = geometric mean of its two edges.
    """
    if spacing == "linear":
        edges = torch.linspace(min_depth, max_depth, num_bins + 1, dtype=torch.float64)
        centres = 0.5 * (edges[:-1] + edges[1:])
    elif spacing == "log":
        log_edges = torch.linspace(math.log(min_depth), math.log(max_depth), num_bins + 1, dtype=torch.float64)
        centres = torch.exp(0.5 * (log_edges[:-1] + log_edges[1:]))
    else:
        raise ValueError(f"bin_spacing must be 'linear' or 'log', got {spacing!r}")
    return centres.float()


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit ``x + conv(relu(conv(relu(x))))``: ``(B, C, h, w) -> (B, C, h, w)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """RefineNet-style fusion: ``x (+ RCU(skip))`` -> RCU -> bilinear resize to ``size`` -> 1x1 conv.

    ``x``, ``skip``: ``(B, F, h, w)``; output ``(B, F, *size)``. The coarsest block has no skip.
    """

    def __init__(self, channels: int, has_skip: bool = True):
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels) if has_skip else None
        self.unit = ResidualConvUnit(channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        if skip is not None:
            if self.skip_unit is None:
                raise ValueError("this fusion block was built without a skip input")
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.project(x)


def _resize_layer(channels: int, stride: int, target: int) -> nn.Module:
    """Module that moves a ``(B, C, h, w)`` map from ``stride`` to ``target`` stride (powers-of-two ratios)."""
    if stride == target:
        return nn.Identity()
    if stride > target:
        if stride % target:
            raise ValueError(f"cannot upsample stride {stride} to {target}: not an integer factor")
        r = stride // target
        return nn.ConvTranspose2d(channels, channels, kernel_size=r, stride=r)
    if target % stride:
        raise ValueError(f"cannot downsample stride {stride} to {target}: not an integer factor")
    # kernel 3, padding 1, stride r: output ceil(h / r), so odd maps keep their last row/column.
    return nn.Conv2d(channels, channels, kernel_size=3, stride=target // stride, padding=1)


class Reassemble(nn.Module):
    """One layer: readout -> 1x1 conv -> resize -> 3x3 conv. ``(B, C, h, w) [+ cls (B, C)] -> (B, F, h', w')``."""

    def __init__(self, in_channels: int, post_channels: int, features: int, stride: int, target: int, readout: str):
        super().__init__()
        self.readout = readout
        self.readout_project = (
            nn.Sequential(nn.Linear(2 * in_channels, in_channels), nn.GELU()) if readout == "project" else None
        )
        self.project = nn.Conv2d(in_channels, post_channels, 1)
        self.resize = _resize_layer(post_channels, stride, target)
        self.layer_rn = nn.Conv2d(post_channels, features, 3, padding=1, bias=False)

    def forward(self, x: Tensor, cls: Tensor | None) -> Tensor:
        if self.readout != "ignore":
            if cls is None:
                raise ValueError(f"readout={self.readout!r} needs class tokens (features.cls), got None")
            if self.readout == "add":
                x = x + cls[:, :, None, None]
            else:  # project: concat the cls token to every patch token, Linear(2C -> C) + GELU
                b, c, h, w = x.shape
                tokens = x.flatten(2).transpose(1, 2)  # (B, hw, C)
                tokens = torch.cat([tokens, cls[:, None, :].expand(-1, h * w, -1)], dim=-1)
                x = self.readout_project(tokens).transpose(1, 2).reshape(b, c, h, w)
        return self.layer_rn(self.resize(self.project(x)))


class DPTHead(nn.Module):
    """DPT depth head.

    Args:
        in_channels: ``C_i`` of the 4 backbone maps (shallow -> deep).
        strides: their strides: ``(16, 16, 16, 16)`` for a ViT, ``(4, 8, 16, 32)`` for a ConvNeXt.
        readout: how the ViT class token enters: "ignore", "add", or "project" (concat + Linear + GELU).
            Must be "ignore" for backbones without class tokens (strides not all equal).
        features: fusion width F; default from :func:`default_features` of ``max(in_channels)``.
        post_channels: per-layer widths after the 1x1 projection; default ``[C/8, C/4, C/2, C]`` for a ViT
            (Depth-Anything-V2's choice for ViT-S/B) and ``in_channels`` for a multi-scale backbone.
        output: "regression" (1 channel) or "bins" (``num_bins`` logits mixed AdaBins-style).
        activation: regression only: "relu" (``relu(x) + min_depth``) or "sigmoid" (``sigmoid(x) * max_depth``).
        num_bins, bin_spacing: bins output: count and "linear" / "log" spacing over ``[min_depth, max_depth]``.
        min_depth, max_depth: valid depth range in metres (targets outside it are ignored by the loss).
        silog_lambda: lambda of :class:`SiLogLoss` (Meta's ``sqrt(Var(g) + lambda * Mean(g)^2)``).
        grad_weight: weight of :class:`GradientMatchingLoss`; 0 disables it.
        head_hidden: channels of the last 3x3 conv of the upsampling head.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        readout: str = "ignore",
        features: int | None = None,
        post_channels: Sequence[int] | None = None,
        output: str = "regression",
        activation: str = "relu",
        num_bins: int = 256,
        bin_spacing: str = "linear",
        min_depth: float = 0.001,
        max_depth: float = 10.0,
        silog_lambda: float = 0.15,
        grad_weight: float = 0.0,
        head_hidden: int = 32,
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
        width = max(in_channels)
        features = int(features) if features is not None else default_features(width)
        if post_channels is None:
            post_channels = in_channels if multi_scale else [max(c // d, 1) for c, d in zip(in_channels, (8, 4, 2, 1))]
        post_channels = list(post_channels)
        if len(post_channels) != 4:
            raise ValueError(f"post_channels needs 4 values, got {post_channels}")

        self.in_channels, self.strides, self.readout = in_channels, strides, readout
        self.features, self.post_channels = features, post_channels
        self.output, self.activation = output, activation
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)

        self.reassemble = nn.ModuleList(
            Reassemble(c, p, features, s, t, readout)
            for c, p, s, t in zip(in_channels, post_channels, strides, TARGET_STRIDES)
        )
        # fusion[0] is the finest (stride 4) block, fusion[3] the coarsest (no skip).
        self.fusion = nn.ModuleList(FeatureFusionBlock(features, has_skip=i < 3) for i in range(4))
        out_channels = num_bins if output == "bins" else 1
        self.head_conv1 = nn.Conv2d(features, max(features // 2, 1), 3, padding=1)
        self.head_conv2 = nn.Conv2d(max(features // 2, 1), head_hidden, 3, padding=1)
        self.head_out = nn.Conv2d(head_hidden, out_channels, 1)
        if output == "regression" and activation == "relu":
            # start every pixel well inside the ReLU's live zone (1 m): a random bias can leave them all dead.
            nn.init.constant_(self.head_out.bias, 1.0)
        if output == "bins":
            self.register_buffer("centres", bin_centres(num_bins, min_depth, max_depth, bin_spacing), persistent=False)
        else:
            self.centres = None

        self.silog = SiLogLoss(silog_lambda)
        self.grad_weight = float(grad_weight)
        self.grad_loss = GradientMatchingLoss() if grad_weight > 0 else None

    # ------------------------------------------------------------------ forward
    def bins_to_depth(self, logits: Tensor) -> Tensor:
        """``(B, K, H, W)`` bin logits -> ``(B, 1, H, W)`` depth ``sum_k softmax(logits)_k * centre_k``."""
        dtype = torch.promote_types(logits.dtype, torch.float32)  # no bf16 mixture: it would round depths
        with torch.autocast(device_type=logits.device.type, enabled=False):
            probs = logits.to(dtype).softmax(dim=1)
            return torch.einsum("bkhw,k->bhw", probs, self.centres.to(dtype)).unsqueeze(1)

    def forward(self, features: Features, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """features: 4 maps ``(B, C_i, h_i, w_i)`` -> ``{"depth": (B, 1, H, W)[, "logits": (B, K, H, W)]}``.

        The maps cover ``features.padded_size`` when it is set; the output is upsampled to that size and its
        top-left ``image_size`` corner is returned, so ``image_size`` smaller than the padded size crops padding.
        """
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

        H, W = as_size(image_size[0]), as_size(image_size[1])
        ph, pw = (as_size(v) for v in (features.padded_size or (0, 0)))
        full = (ph, pw) if ph >= H and pw >= W and ph > 0 else (H, W)
        x = self.head_conv1(x)
        x = F.interpolate(x, size=full, mode="bilinear", align_corners=True)
        x = self.head_out(F.relu(self.head_conv2(x)))
        x = x[..., :H, :W]

        if self.output == "bins":
            return {"depth": self.bins_to_depth(x), "logits": x}
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.activation == "relu":
            depth = F.relu(x) + self.min_depth
        else:
            depth = torch.sigmoid(x) * self.max_depth
        return {"depth": depth}

    # --------------------------------------------------------------------- loss
    def valid_mask(self, gt: Tensor) -> Tensor:
        """``(B, H, W)`` metres -> bool mask of finite depths in ``[min_depth, max_depth]`` (0 is invalid)."""
        return torch.isfinite(gt) & (gt > 0) & (gt >= self.min_depth) & (gt <= self.max_depth)

    def loss(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """outputs["depth"] ``(B, 1, H, W)``, targets["depth"] ``(B, H, W)`` metres, 0 = invalid.

        Returns ``{"loss_silog": ...}`` plus ``"loss_grad"`` (already multiplied by ``grad_weight``) when enabled.
        """
        pred = outputs["depth"]
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # losses in >= float32, also under autocast
        gt = targets["depth"].to(pred.dtype)
        if gt.dim() == 4:
            gt = gt[:, 0]
        if pred.shape[-2:] != gt.shape[-2:]:
            pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=False)
        pred = pred[:, 0]
        mask = self.valid_mask(gt)
        gt = torch.where(mask, gt, torch.ones_like(gt))  # keep NaN/inf targets out of every op
        losses = {"loss_silog": self.silog(pred, gt, mask)}
        if self.grad_loss is not None:
            losses["loss_grad"] = self.grad_weight * self.grad_loss(pred, gt, mask)
        return losses

    def predict(self, outputs: dict[str, Tensor], image_size: tuple[int, int]) -> Tensor:
        """Depth ``(B, 1, H, W)`` in metres at ``image_size``."""
        depth = outputs["depth"]
        size = (as_size(image_size[0]), as_size(image_size[1]))
        if tuple(depth.shape[-2:]) != size:
            depth = F.interpolate(depth, size=size, mode="bilinear", align_corners=False)
        return depth
