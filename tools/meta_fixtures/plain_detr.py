"""Write fixtures of Meta's DINOv3 COCO detector (Plain-DETR, ``dinov3_vit7b16_de``) on random weights.

Builds Meta's ``PlainDETRReParam`` exactly as ``dinov3/hub/detectors.py`` configures it (windows wrapper,
global encoder, 4 proposal levels, reparam boxes, global RPE decoder, mixed selection, look-forward-twice), but
small: a 4-block 64-dim DINOv3 ViT (the layout of our ``vit_test`` backbone), hidden 64, 1 encoder and 2 decoder
layers, 25 + 25 queries. Writes to ``tests/fixtures/meta/detr/``:

- ``backbone.manifest.json``: the ViT's seeded weights in Meta's key layout (``tests/seeded_weights.py``; the RoPE
  periods and the qkv bias masks literal); ``detector.manifest.json``: the detector without the backbone, Meta's released key layout
  (``dinov3_vit7b16_coco2017_detr_head-*.pth`` holds ``{"model": state_dict}``; the tests write that file from the
  manifest), one key per tensor (the decoder's aliases of ``class_embed`` / ``bbox_embed`` left out);
- ``io.npz``: input images (2 x 3 x 160 x 208, normalized), Meta's windowed features (the input of
  ``input_proj``), outputs of inference (25 queries): final and auxiliary logits / boxes, encoder proposal
  logits / boxes, post-processed top-50 scores / labels / boxes; and of the full query set (25 one-to-one +
  25 one-to-many, masked self-attention) as in training;
- ``io_padded.npz``: a batch of two differently sized images (``PADDED``: 128 x 176 and 90 x 120) zero-padded
  bottom/right to one size with Meta's ``NestedTensor`` padding mask (``padded_images`` kept as float16, the values
  Meta ran on): Meta's windowed features and their mask, the same outputs (encoder proposal logits: the first 8
  classes, class 0 ranking them), top-50 post-processing at each image's own size, and the full query set;
- ``config.json``: the sizes used.

Rerun (needs torch, torchvision, numpy; Meta's repository at commit 6876159)::

    git clone https://github.com/facebookresearch/dinov3 /tmp/dinov3 && git -C /tmp/dinov3 checkout 6876159
    OMP_NUM_THREADS=1 python tools/meta_fixtures/plain_detr.py --meta-repo /tmp/dinov3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from reference_arrays import save_arrays  # noqa: E402
from seeded_weights import seeded_state_dict, write_manifest  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "meta" / "detr"
SIZES = dict(hidden_dim=64, nheads=8, num_encoder_layers=1, dec_layers=2, dim_feedforward=128,
             decoder_rpe_hidden_dim=32, num_queries_one2one=25, num_queries_one2many=25, num_classes=91, topk=50,
             n_windows_sqrt=3, embed_dim=64, depth=4, num_heads=2)
IMAGE = (2, 3, 160, 208)
PADDED = ((128, 176), (90, 120))  # image sizes of the padded batch; the first one sets the padded size
ENC_CLASSES = 8  # encoder proposal logits kept in io_padded.npz (column 0 ranks the proposals)
ALIASES = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")  # of bbox_embed / class_embed


def build(meta_repo: str):
    sys.path.insert(0, meta_repo)
    from dinov3.eval.detection.config import DetectionHeadConfig
    from dinov3.eval.detection.models.detr import PostProcess, build_model
    from dinov3.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    vit = DinoVisionTransformer(
        img_size=224, patch_size=16, in_chans=3, pos_embed_rope_base=100, pos_embed_rope_normalize_coords="separate",
        pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32", embed_dim=SIZES["embed_dim"],
        depth=SIZES["depth"], num_heads=SIZES["num_heads"], ffn_ratio=4, qkv_bias=True, drop_path_rate=0.0,
        layerscale_init=1.0e-05, norm_layer="layernormbf16", ffn_layer="mlp", ffn_bias=True, proj_bias=True,
        n_storage_tokens=4, mask_k_bias=True)
    vit.init_weights()
    literal = tuple(k for k in vit.state_dict() if k.endswith((".periods", ".bias_mask")))  # values with meaning
    values, vit_manifest = seeded_state_dict(vit.state_dict(), 11, literal)
    vit.load_state_dict(values)
    vit.eval()
    config = DetectionHeadConfig(
        with_box_refine=True, two_stage=True, mixed_selection=True, look_forward_twice=True, k_one2many=6,
        lambda_one2many=1.0, num_queries_one2one=SIZES["num_queries_one2one"],
        num_queries_one2many=SIZES["num_queries_one2many"], reparam=True, num_feature_levels=1,
        dec_layers=SIZES["dec_layers"], dim_feedforward=SIZES["dim_feedforward"], dropout=0.0, norm_type="pre_norm",
        proposal_feature_levels=4, proposal_min_size=50, decoder_type="global_rpe_decomp",
        decoder_use_checkpoint=False, decoder_rpe_hidden_dim=SIZES["decoder_rpe_hidden_dim"],
        decoder_rpe_type="linear", layers_to_use=None, blocks_to_train=None, add_transformer_encoder=True,
        num_encoder_layers=SIZES["num_encoder_layers"], backbone_use_layernorm=False,
        num_classes=SIZES["num_classes"], aux_loss=True, topk=SIZES["topk"], hidden_dim=SIZES["hidden_dim"],
        nheads=SIZES["nheads"])
    config.n_windows_sqrt = SIZES["n_windows_sqrt"]
    config.proposal_in_stride = vit.patch_size
    config.proposal_tgt_strides = [int(m * vit.patch_size) for m in (0.5, 1, 2, 4)]
    config.layers_to_use = [m * vit.n_blocks // 4 - 1 for m in range(1, 5)]
    detector = build_model(vit, config)
    head = {k: v for k, v in detector.state_dict().items() if not k.startswith(("backbone.",) + ALIASES)}
    values, head_manifest = seeded_state_dict(head, 12)
    missing = detector.load_state_dict(values, strict=False).missing_keys
    unfilled = [k for k in missing if not k.startswith(("backbone.",) + ALIASES)]
    assert not unfilled, unfilled
    for key, value in detector.state_dict().items():  # the aliases are the same tensors as the seeded ones
        if key.startswith(ALIASES):
            assert torch.equal(value, values[key.removeprefix("transformer.decoder.")]), key
    detector.eval()
    return detector, PostProcess(config.topk, config.reparam), vit_manifest, head_manifest


def run(detector, postprocess, images, num_queries, mask=None):
    from dinov3.eval.detection.util.misc import NestedTensor

    detector.num_queries = num_queries
    detector.transformer.two_stage_num_proposals = num_queries
    if mask is None:
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    samples = NestedTensor(images, mask)
    with torch.no_grad():
        out = detector(samples)
    return out, samples


def padded_batch(detector, postprocess) -> dict[str, torch.Tensor]:
    """Meta's outputs for ``PADDED`` images batched by its ``nested_tensor_from_tensor_list`` (zero padding, mask)."""
    from dinov3.eval.detection.util.misc import nested_tensor_from_tensor_list

    generator = torch.Generator().manual_seed(2)
    images = [torch.randn(3, h, w, generator=generator).half().float() for h, w in PADDED]
    batch = nested_tensor_from_tensor_list(images)
    n1, n2 = SIZES["num_queries_one2one"], SIZES["num_queries_one2many"]
    out, samples = run(detector, postprocess, batch.tensors, n1, batch.mask)
    with torch.no_grad():
        features, _ = detector.backbone(samples)
    tensors = {"padded_images": batch.tensors.half(), "pixel_mask": batch.mask, "sizes": torch.tensor(PADDED),
               "features": features[0].tensors, "feature_mask": features[0].mask}
    for key in ("pred_logits", "pred_boxes", "pred_boxes_old", "pred_deltas"):
        tensors[key] = out[key]
    for i, aux in enumerate(out["aux_outputs"]):
        tensors[f"aux{i}_pred_logits"], tensors[f"aux{i}_pred_boxes"] = aux["pred_logits"], aux["pred_boxes"]
    tensors["enc_pred_logits"] = out["enc_outputs"]["pred_logits"][..., :ENC_CLASSES]
    tensors["enc_pred_boxes"] = out["enc_outputs"]["pred_boxes"]
    tensors["enc_pred_boxes_old"] = out["enc_outputs"]["pred_boxes_old"]
    sizes = torch.tensor(PADDED)
    results = postprocess(out, target_sizes=sizes, original_target_sizes=sizes)
    for key in ("scores", "labels", "boxes"):
        tensors[f"post_{key}"] = torch.stack([r[key] for r in results])
    full, _ = run(detector, postprocess, batch.tensors, n1 + n2, batch.mask)
    for key in ("pred_logits", "pred_boxes", "pred_logits_one2many", "pred_boxes_one2many"):
        tensors[f"full_{key}"] = full[key]
    # Meta's semantics, checked here: the full-size image (all valid) gives the same result alone; the padded one
    # gives the same result padded alone with its mask (batch members do not interact), not its unpadded result.
    alone, _ = run(detector, postprocess, batch.tensors[:1], n1)
    small, _ = run(detector, postprocess, batch.tensors[1:], n1, batch.mask[1:])
    for name, other, i in (("full-size image alone", alone, 0), ("padded image alone", small, 1)):
        diff = (other["pred_logits"][0] - out["pred_logits"][i]).abs().max().item()
        print(f"{name}: max |logit difference| to the batch {diff:.2e}")
        assert diff < 1e-4, name
    top = out["enc_outputs"]["pred_logits"][..., 0].sort(dim=1, descending=True).values
    print(f"padded batch: top-{n1} proposal score margin {(top[:, n1 - 1] - top[:, n1]).min().item():.2e}")
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meta-repo", default=os.environ.get("DINOV3_REPO"), help="Meta's dinov3 checkout")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not args.meta_repo:
        parser.error("--meta-repo (or DINOV3_REPO) is required")
    detector, postprocess, vit_manifest, head_manifest = build(args.meta_repo)
    images = torch.randn(*IMAGE, generator=torch.Generator().manual_seed(1))
    tensors: dict[str, torch.Tensor] = {"images": images}
    n1, n2 = SIZES["num_queries_one2one"], SIZES["num_queries_one2many"]

    out, samples = run(detector, postprocess, images, n1)
    with torch.no_grad():
        features, _ = detector.backbone(samples)
    tensors["features"] = features[0].tensors
    for key in ("pred_logits", "pred_boxes", "pred_boxes_old", "pred_deltas"):
        tensors[key] = out[key]
    for i, aux in enumerate(out["aux_outputs"]):
        tensors[f"aux{i}_pred_logits"], tensors[f"aux{i}_pred_boxes"] = aux["pred_logits"], aux["pred_boxes"]
    tensors["enc_pred_logits"] = out["enc_outputs"]["pred_logits"]
    tensors["enc_pred_boxes"] = out["enc_outputs"]["pred_boxes"]
    sizes = torch.tensor([list(IMAGE[2:])] * IMAGE[0])
    results = postprocess(out, target_sizes=sizes, original_target_sizes=sizes)
    for key in ("scores", "labels", "boxes"):
        tensors[f"post_{key}"] = torch.stack([r[key] for r in results])
    top = out["enc_outputs"]["pred_logits"][..., 0].sort(dim=1, descending=True).values
    margin = (top[:, n1 - 1] - top[:, n1]).min().item()

    full, _ = run(detector, postprocess, images, n1 + n2)
    for key in ("pred_logits", "pred_boxes", "pred_logits_one2many", "pred_boxes_one2many"):
        tensors[f"full_{key}"] = full[key]

    padded = padded_batch(detector, postprocess)

    args.out.mkdir(parents=True, exist_ok=True)
    save_arrays({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, args.out / "io.npz")
    save_arrays({k: v.float() if v.dtype in (torch.float32, torch.float64) else v for k, v in padded.items()},
                args.out / "io_padded.npz")
    write_manifest(vit_manifest, args.out / "backbone.manifest.json")
    write_manifest(head_manifest, args.out / "detector.manifest.json")
    config = dict(SIZES, image=list(IMAGE), padded=[list(s) for s in PADDED], enc_classes=ENC_CLASSES)
    (args.out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {args.out}; top-{n1} proposal score margin {margin:.2e}")


if __name__ == "__main__":
    main()
