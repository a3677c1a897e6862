"""Write the Meta-parity fixtures of the ViT-Adapter + Mask2Former segmentor (``tests/test_m2f_meta.py``).

Builds Meta's own modules at a tiny size, fills them with seeded weights and records what they compute. No weight
file is committed: the weights are described by manifests (``tests/seeded_weights.py``: key, shape, dtype and a
seed), from which the tests rebuild the same state dicts and ``torch.save`` them into temporary files in the layout
of Meta's files before reading them through our loaders.

- backbone: Meta's ``DinoVisionTransformer`` with the ViT-S/16 recipe of ``dinov3_vits16`` shrunk to our
  ``vit_test`` shape (width 64, 4 blocks, 2 heads); ``backbone.manifest.json`` in Meta's key layout (a flat
  ``backbone.pth``), with the RoPE periods and the k-bias masks kept verbatim (``literal``);
- segmentor: ``build_segmentation_decoder(decoder_type="m2f")`` = ``FeatureDecoder([DINOv3_Adapter,
  Mask2FormerHead])``, hidden_dim 64, 19 classes, adapter stem width 16. Meta's head hard-codes a 4096-wide
  FFN, 6 encoder and 9 decoder layers and 100 queries; to keep the files small its pixel decoder and transformer
  decoder are rebuilt from Meta's classes with ``dim_feedforward=128``, 2 encoder and 4 decoder layers, 20 queries
  (every other argument as in ``Mask2FormerHead``; 4 decoder layers still cycle through all 3 levels; with 100
  queries the scores, summed over queries, reach ~50 on these weights and their float32 rounding ~1e-4, the
  tests' tolerance; a count other than 100 also checks that the converter reads it). Its state dict without
  the backbone keys, as Meta releases it (a flat ``segmentor.pth``, keys ``segmentation_model.{0,1}.*``), is
  ``segmentor.manifest.json``;
- every parameter and BatchNorm statistic is seeded (trained-like magnitudes: ``1/sqrt(fan_in)`` matrices, norm
  scales and variances in [0.5, 1.5], small biases), so that no layer is an identity as it is at init;
- ``io.npz``: ``images`` (2, 3, 64, 96), the adapter levels ``level1..level4``, the head's
  ``pred_logits`` / ``pred_masks`` (eval mode) and, for the first image, ``probs`` =
  ``softmax(logits)[..., :-1]`` x ``sigmoid(masks resized to the image)`` summed over queries, as Meta's
  segmentation eval computes it.

Rerun (about 10 s; needs Meta's repository, github:facebookresearch/dinov3 at commit 6876159, and ``termcolor``)::

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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # seeded_weights, reference_arrays
from reference_arrays import save_arrays  # noqa: E402
OUT = ROOT / "tests" / "fixtures" / "meta" / "m2f_adapter"
SEED = 0
IMAGE_SIZE = (64, 96)
HIDDEN_DIM, FFN_DIM, NUM_CLASSES, CONV_INPLANE = 64, 128, 19, 16
NUM_QUERIES = 20  # Meta: 100
ENC_LAYERS, DEC_LAYERS = 2, 4  # Meta: 6, 9


def seed_weights(module: torch.nn.Module, seed: int, path: Path, skip: str | None = None) -> None:
    """Fill ``module`` (but the keys containing ``skip``) with seeded values and write their manifest to ``path``.

    Meta's RoPE periods and the masks of its k bias are buffers whose values carry meaning: they stay as they are.
    """
    from seeded_weights import seeded_state_dict, write_manifest

    state = {k: v for k, v in module.state_dict().items() if skip is None or skip not in k}
    literal = tuple(k for k in state if k.endswith(("rope_embed.periods", "bias_mask")))
    values, manifest = seeded_state_dict(state, seed, literal=literal)
    missing, unexpected = module.load_state_dict(values, strict=False)
    assert not unexpected and all(skip in k for k in missing), (missing, unexpected)
    write_manifest(manifest, path)


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
    args.out.mkdir(parents=True, exist_ok=True)
    seed_weights(backbone, 1, args.out / "backbone.manifest.json")
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
        num_queries=NUM_QUERIES, nheads=16, dim_feedforward=FFN_DIM, dec_layers=DEC_LAYERS, pre_norm=False, mask_dim=HIDDEN_DIM,
        enforce_input_project=False)
    model = FeatureDecoder(torch.nn.ModuleList([adapter, head]),
                           autocast_ctx=partial(torch.autocast, device_type="cpu", enabled=False)).eval()
    seed_weights(model, 2, args.out / "segmentor.manifest.json", skip=".backbone.")

    images = torch.randn(2, 3, *IMAGE_SIZE, generator=generator)
    with torch.no_grad():
        levels = adapter(images)
        out = head(levels)
        masks = F.interpolate(out["pred_masks"], size=IMAGE_SIZE, mode="bilinear", align_corners=False)
        probs = torch.einsum("bqc,bqhw->bchw", out["pred_logits"].softmax(-1)[..., :-1], masks.sigmoid())[0]

    tensors = {"images": images, "pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"], "probs": probs}
    tensors.update({f"level{i}": levels[str(i)] for i in range(1, 5)})
    save_arrays(tensors, args.out / "io.npz")
    for f in sorted(args.out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1e6:.2f} MB")
    state = {k: v for k, v in model.state_dict().items() if ".backbone." not in k}
    print(f"patch {patch}, segmentor keys {len(state)}, params {sum(v.numel() for v in state.values()):,}")


if __name__ == "__main__":
    main()
