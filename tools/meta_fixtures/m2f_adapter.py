"""Write the Meta-parity fixtures of the ViT-Adapter + Mask2Former segmentor (``tests/test_m2f_meta.py``).

Builds Meta's own modules on random weights (fixed seed) at a tiny size and records what they compute:

- backbone: Meta's ``DinoVisionTransformer`` with the ViT-S/16 recipe of ``dinov3_vits16`` shrunk to our
  ``vit_test`` shape (width 64, 4 blocks, 2 heads), saved in Meta's key layout (``backbone.pth``);
- segmentor: ``build_segmentation_decoder(decoder_type="m2f")`` = ``FeatureDecoder([DINOv3_Adapter,
  Mask2FormerHead])``, hidden_dim 64, 19 classes, adapter stem width 16. Meta's head hard-codes a 4096-wide
  FFN, 6 encoder and 9 decoder layers; to keep the files small its pixel decoder and transformer decoder
  are rebuilt from Meta's classes with ``dim_feedforward=128``, 2 encoder and 4 decoder layers (every other
  argument as in ``Mask2FormerHead``; 4 decoder layers still cycle through all 3 levels). Its state dict without
  the backbone keys is saved as Meta releases it (``segmentor.pth``, keys ``segmentation_model.{0,1}.*``);
- every parameter and BatchNorm statistic is perturbed so that no layer is an identity at init;
- ``io.safetensors``: ``images`` (2, 3, 64, 96), the adapter levels ``level1..level4``, the head's
  ``pred_logits`` / ``pred_masks`` (eval mode) and, for the first image, ``probs`` =
  ``softmax(logits)[..., :-1]`` x ``sigmoid(masks resized to the image)`` summed over queries, as Meta's
  segmentation eval computes it.

Rerun (needs Meta's repository, github:facebookresearch/dinov3 at commit 6876159, and ``termcolor``)::

    git clone https://github.com/facebookresearch/dinov3 /tmp/dinov3 && git -C /tmp/dinov3 checkout 6876159
    OMP_NUM_THREADS=1 python tools/meta_fixtures/m2f_adapter.py --meta-repo /tmp/dinov3
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "meta" / "m2f_adapter"
SEED = 0
IMAGE_SIZE = (64, 96)
HIDDEN_DIM, FFN_DIM, NUM_CLASSES, CONV_INPLANE = 64, 128, 19, 16
ENC_LAYERS, DEC_LAYERS = 2, 4  # Meta: 6, 9


def perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Add noise to every parameter and BatchNorm statistic (variances stay positive)."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(("bias_mask", "rope_embed.periods")):
                continue
            elif name.endswith(("ls1.gamma", "ls2.gamma")):
                tensor.copy_(0.1 + 0.1 * noise)
            else:
                tensor.add_(0.05 * noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-repo", default=os.environ.get("DINOV3_REPO"), help="checkout of facebookresearch/dinov3")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not args.meta_repo:
        parser.error("pass --meta-repo PATH or set DINOV3_REPO")
    sys.path.insert(0, str(Path(args.meta_repo).resolve()))
    warnings.filterwarnings("ignore")

    from dinov3.eval.segmentation.models import FeatureDecoder
    from dinov3.eval.segmentation.models.backbone.dinov3_adapter import DINOv3_Adapter
    from dinov3.eval.segmentation.models.heads.mask2former_head import Mask2FormerHead
    from dinov3.eval.segmentation.models.heads.mask2former_transformer_decoder import MultiScaleMaskedTransformerDecoder
    from dinov3.eval.segmentation.models.heads.pixel_decoder import MSDeformAttnPixelDecoder
    from dinov3.hub.backbones import _make_dinov3_vit

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    backbone = _make_dinov3_vit(
        pretrained=False, img_size=224, patch_size=16, in_chans=3, pos_embed_rope_base=100,
        pos_embed_rope_normalize_coords="separate", pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32",
        embed_dim=64, depth=4, num_heads=2, ffn_ratio=4, qkv_bias=True, drop_path_rate=0.0, layerscale_init=1.0e-05,
        norm_layer="layernormbf16", ffn_layer="mlp", ffn_bias=True, proj_bias=True, n_storage_tokens=4,
        mask_k_bias=True)
    backbone.init_weights()
    perturb(backbone, generator)
    embed_dim, patch = backbone.embed_dim, backbone.patch_size

    adapter = DINOv3_Adapter(backbone, interaction_indexes=[0, 1, 2, 3], conv_inplane=CONV_INPLANE)
    shapes = {"1": [embed_dim, 0, 0, 4], "2": [embed_dim, 0, 0, 4], "3": [embed_dim, 0, 0, 4], "4": [embed_dim, 0, 0, 4]}
    head = Mask2FormerHead(input_shape=shapes, hidden_dim=HIDDEN_DIM, num_classes=NUM_CLASSES, ignore_value=255)
    head.pixel_decoder = MSDeformAttnPixelDecoder(
        input_shape=shapes, transformer_dropout=0.0, transformer_nheads=16, transformer_dim_feedforward=FFN_DIM,
        transformer_enc_layers=ENC_LAYERS, conv_dim=HIDDEN_DIM, mask_dim=HIDDEN_DIM, norm="GN",
        transformer_in_features=["1", "2", "3", "4"], common_stride=4)
    head.predictor = MultiScaleMaskedTransformerDecoder(
        in_channels=HIDDEN_DIM, mask_classification=True, num_classes=NUM_CLASSES, hidden_dim=HIDDEN_DIM,
        num_queries=100, nheads=16, dim_feedforward=FFN_DIM, dec_layers=DEC_LAYERS, pre_norm=False, mask_dim=HIDDEN_DIM,
        enforce_input_project=False)
    perturb(adapter, generator)  # the backbone inside is perturbed a second time: saved after this
    perturb(head, generator)
    model = FeatureDecoder(torch.nn.ModuleList([adapter, head]),
                           autocast_ctx=partial(torch.autocast, device_type="cpu", enabled=False)).eval()

    images = torch.randn(2, 3, *IMAGE_SIZE, generator=generator)
    with torch.no_grad():
        levels = adapter(images)
        out = head(levels)
        masks = F.interpolate(out["pred_masks"], size=IMAGE_SIZE, mode="bilinear", align_corners=False)
        probs = torch.einsum("bqc,bqhw->bchw", out["pred_logits"].softmax(-1)[..., :-1], masks.sigmoid())[0]

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if ".backbone." not in k}
    torch.save(state, args.out / "segmentor.pth")
    torch.save(backbone.state_dict(), args.out / "backbone.pth")
    tensors = {"images": images, "pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"], "probs": probs}
    tensors.update({f"level{i}": levels[str(i)] for i in range(1, 5)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / "io.safetensors"))
    for f in sorted(args.out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1e6:.2f} MB")
    print(f"patch {patch}, segmentor keys {len(state)}, params {sum(v.numel() for v in state.values()):,}")


if __name__ == "__main__":
    main()
