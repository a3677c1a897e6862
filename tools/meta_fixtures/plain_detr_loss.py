"""Write fixtures of Plain-DETR's matcher and criterion, the training loss of Meta's DINOv3 COCO detector.

Meta's repository (``dinov3/eval/detection``) holds the detector for inference only: no matcher, no criterion.
Its model is Plain-DETR's ``PlainDETRReParam``; the training code is the upstream Plain-DETR repository
(github.com/impiga/Plain-DETR), whose ``HungarianMatcher`` (``models/matcher.py``), ``SetCriterion``
(``models/detr.py``) and hybrid-matching step ``train_hybrid`` (``engine.py``) this script runs, configured as
its reparam recipe (``configs/swinv2_small_mim_pt_boxrpe_reparam.sh`` with ``main.py``'s defaults): matching
costs and loss weights class 2 / L1 (of deltas) 1 / GIoU 2, focal alpha 0.25, ``reparam=True``, auxiliary losses
on every decoder layer, class-agnostic encoder proposals; hybrid matching with Meta's ``k_one2many = 6`` and
``lambda_one2many = 1.0`` (``dinov3/eval/detection/config.py``).

Inputs are seeded random outputs shaped as ``PlainDETRReParam`` emits them in training, for a padded batch of two
images of different sizes (``IMAGES``) with 3 and 5 target boxes (cxcywh absolute pixels, as Plain-DETR's
``Normalize(reparam=True)`` leaves them), ``K`` classes: 4 proposal levels (strides 8/16/32/64, anchors of side
``50 * 2**l``; invalid anchors filled with ``max(h, w) * 8`` of the stride-8 map as ``TransformerReParam`` does,
their class-0 logit low) whose boxes are ``delta2bbox(anchor, delta)`` clipped to each image; the top ``Q1 + Q2``
proposals (class column 0) give the first decoder layer's references, each layer's boxes the next layer's
references; ``L`` decoder layers; ``Q1`` one-to-one and ``Q2`` one-to-many queries. Writes
``tests/fixtures/meta/detr_loss/loss.npz`` (``tests/reference_arrays.py``):

- inputs: ``{set}.pred_logits / pred_boxes / pred_boxes_old / pred_deltas`` for the sets ``final``, ``aux{i}``,
  ``enc``, ``final_one2many``, ``aux{i}_one2many``; ``targets.{b}.boxes`` / ``targets.{b}.labels``;
- matcher indices of every set, in the order the criterion calls the matcher: ``indices.{set}.{b}`` ``(2, n)``
  (query indices, target indices);
- every loss term of ``train_hybrid``'s loss dict, unweighted (one-to-many terms times ``lambda_one2many``) as
  ``loss.{name}`` (``loss_ce``, ``loss_bbox``, ``loss_giou`` with suffixes ``_{i}``, ``_enc``, ``_one2many``),
  their weights as ``weight.{name}``, and ``total`` (the weighted sum, what Plain-DETR backpropagates);
- ``grad.{set}.{key}``: the gradient of ``total`` with respect to every prediction of the decoder sets and to the
  encoder's ``pred_boxes`` / ``pred_deltas`` (each prediction a leaf of its own).

Plain-DETR imports load on CPU (no compiled ops); only ``engine.py``'s logging import ``wandb`` is stubbed with an
empty module when it is not installed.

Rerun (needs torch, torchvision, timm, scipy, numpy, pycocotools; Plain-DETR at commit 6ad930b)::

    git clone https://github.com/impiga/Plain-DETR /tmp/plain_detr && git -C /tmp/plain_detr checkout 6ad930b
    OMP_NUM_THREADS=1 python tools/meta_fixtures/plain_detr_loss.py --ref-repo /tmp/plain_detr
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from reference_arrays import save_arrays  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "meta" / "detr_loss"
IMAGES = ((128, 96), (96, 128))  # (H, W) of the two images; the batch is padded to 128 x 128
NUM_BOXES = (3, 5)
K, Q1, Q2, L = 20, 20, 20, 3  # classes, one-to-one / one-to-many queries, decoder layers
LEVEL_STRIDES, MIN_SIZE = (8, 16, 32, 64), 50.0
COSTS = dict(set_cost_class=2.0, set_cost_bbox=1.0, set_cost_giou=2.0)
COEFS = dict(cls_loss_coef=2.0, bbox_loss_coef=1.0, giou_loss_coef=2.0)
FOCAL_ALPHA, K_ONE2MANY, LAMBDA_ONE2MANY = 0.25, 6, 1.0
GRAD_ENC = ("pred_boxes", "pred_deltas")  # encoder gradients kept (its logits' would double the file)


def import_reference(ref_repo: str):
    sys.path.insert(0, ref_repo)
    try:
        import wandb  # noqa: F401
    except ImportError:
        sys.modules["wandb"] = types.ModuleType("wandb")  # engine.py logs with it; train_hybrid does not
    import engine
    from models import detr, matcher
    from util import box_ops

    return engine, detr, matcher, box_ops


def anchors(padded: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, S, 4)`` cxcywh anchors of all levels and ``(B, S)`` validity, Plain-DETR's reparam proposals."""
    H, W = padded
    fill = max(H, W) // LEVEL_STRIDES[0] * LEVEL_STRIDES[0]
    out, valid = [], []
    for b, (h, w) in enumerate(IMAGES):
        per_image, ok = [], []
        for lvl, s in enumerate(LEVEL_STRIDES):
            ys, xs = torch.meshgrid(torch.arange(H // s), torch.arange(W // s), indexing="ij")
            cx, cy = (xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s
            side = torch.full_like(cx, MIN_SIZE * 2**lvl)
            box = torch.stack([cx, cy, side, side], -1)
            inside = (cx < w) & (cy < h)
            size = torch.tensor([w, h, w, h], dtype=torch.float32)
            ok.append(inside & ((box > 0.01 * size) & (box < 0.99 * size)).all(-1))
            per_image.append(box)
        out.append(torch.cat(per_image))
        valid.append(torch.cat(ok))
    boxes, valid = torch.stack(out), torch.stack(valid)
    return boxes.masked_fill(~valid[..., None], float(fill)), valid


def random_targets(gen: torch.Generator) -> list[dict]:
    targets = []
    for (h, w), n in zip(IMAGES, NUM_BOXES):
        size = torch.tensor([w, h], dtype=torch.float32)
        lo = torch.rand(n, 2, generator=gen) * 0.7 * size
        wh = 8 + torch.rand(n, 2, generator=gen) * (size - lo - 8)
        xyxy = torch.cat([lo, lo + wh], -1)
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
        targets.append({"boxes": cxcywh, "labels": torch.randint(0, K, (n,), generator=gen)})
    return targets


def random_outputs(box_ops, gen: torch.Generator) -> dict:
    """Training outputs of ``PlainDETRReParam`` (hybrid matching), random but consistent."""
    padded = (max(h for h, _ in IMAGES), max(w for _, w in IMAGES))
    anchor, valid = anchors(padded)
    B, S = anchor.shape[:2]
    valid_h = torch.tensor([h for h, _ in IMAGES], dtype=torch.float32).view(B, 1, 1)
    valid_w = torch.tensor([w for _, w in IMAGES], dtype=torch.float32).view(B, 1, 1)
    max_shape = (valid_h, valid_w)

    def decode(reference, deltas):
        return box_ops.box_xyxy_to_cxcywh(box_ops.delta2bbox(reference, deltas, max_shape))

    enc_logits = torch.randn(B, S, K, generator=gen) * 1.5 - 4.0  # most proposals: confident background
    enc_logits[..., 0] = enc_logits[..., 0].masked_fill(~valid, -6.0)  # invalid proposals: no memory, low score
    enc_deltas = torch.randn(B, S, 4, generator=gen) * 0.3
    enc_boxes = decode(anchor, enc_deltas)
    top = enc_logits[..., 0].topk(Q1 + Q2, dim=1).indices
    reference = torch.gather(enc_boxes, 1, top[..., None].expand(-1, -1, 4))
    layers = []
    for _ in range(L):
        logits = torch.randn(B, Q1 + Q2, K, generator=gen) * 1.5 - 2.0
        deltas = torch.randn(B, Q1 + Q2, 4, generator=gen) * 0.3
        boxes = decode(reference, deltas)
        layers.append({"pred_logits": logits, "pred_boxes": boxes, "pred_boxes_old": reference, "pred_deltas": deltas})
        reference = boxes
    one2one = [{k: v[:, :Q1] for k, v in layer.items()} for layer in layers]
    one2many = [{k: v[:, Q1:] for k, v in layer.items()} for layer in layers]
    out = dict(one2one[-1])
    out.update({k + "_one2many": v for k, v in one2many[-1].items()})
    out["aux_outputs"] = one2one[:-1]
    out["aux_outputs_one2many"] = one2many[:-1]
    out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes, "pred_boxes_old": anchor,
                          "pred_deltas": enc_deltas}
    return out


def as_leaves(outputs: dict) -> dict:
    """``outputs`` with every prediction a leaf tensor that requires grad (each set's own copy)."""
    def leaves(pred: dict) -> dict:
        return {k: v.detach().clone().requires_grad_() for k, v in pred.items()}

    out = leaves({k: v for k, v in outputs.items() if k.startswith("pred_")})
    out["aux_outputs"] = [leaves(a) for a in outputs["aux_outputs"]]
    out["aux_outputs_one2many"] = [leaves(a) for a in outputs["aux_outputs_one2many"]]
    out["enc_outputs"] = leaves(outputs["enc_outputs"])
    return out


def prediction_sets(outputs: dict) -> dict[str, dict]:
    """The sets in the order Plain-DETR's criterion matches them (one-to-one, then one-to-many)."""
    sets = {"final": {k: v for k, v in outputs.items() if k.startswith("pred_") and "one2many" not in k}}
    sets.update({f"aux{i}": a for i, a in enumerate(outputs["aux_outputs"])})
    sets["enc"] = outputs["enc_outputs"]
    sets["final_one2many"] = {k.removesuffix("_one2many"): v for k, v in outputs.items()
                              if k.startswith("pred_") and k.endswith("_one2many")}
    sets.update({f"aux{i}_one2many": a for i, a in enumerate(outputs["aux_outputs_one2many"])})
    return sets


class RecordingMatcher(torch.nn.Module):
    """Plain-DETR's matcher, keeping the indices of every call."""

    def __init__(self, matcher):
        super().__init__()
        self.matcher = matcher
        self.calls = []

    def forward(self, outputs, targets):
        indices = self.matcher(outputs, targets)
        self.calls.append(indices)
        return indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref-repo", default=os.environ.get("PLAIN_DETR_REPO"),
                        help="Plain-DETR checkout at commit 6ad930b (default: env PLAIN_DETR_REPO)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not args.ref_repo:
        parser.error("--ref-repo (or PLAIN_DETR_REPO) is required")
    engine, detr, matcher_module, box_ops = import_reference(args.ref_repo)

    gen = torch.Generator().manual_seed(0)
    targets = random_targets(gen)
    outputs = as_leaves(random_outputs(box_ops, gen))

    matcher = RecordingMatcher(matcher_module.HungarianMatcher(
        cost_class=COSTS["set_cost_class"], cost_bbox=COSTS["set_cost_bbox"], cost_giou=COSTS["set_cost_giou"],
        cost_bbox_type="reparam"))
    # the weight dict as Plain-DETR's build() makes it with aux_loss, two_stage and hybrid matching
    base = {"loss_ce": COEFS["cls_loss_coef"], "loss_bbox": COEFS["bbox_loss_coef"],
            "loss_giou": COEFS["giou_loss_coef"]}
    weight_dict = dict(base)
    for suffix in [f"_{i}" for i in range(L - 1)] + ["_enc"]:
        weight_dict.update({k + suffix: v for k, v in base.items()})
    weight_dict = {**weight_dict, **{k + "_one2many": v for k, v in weight_dict.items()}}
    criterion = detr.SetCriterion(K, matcher, weight_dict, ["labels", "boxes", "cardinality"],
                                  focal_alpha=FOCAL_ALPHA, reparam=True)
    loss_dict = engine.train_hybrid(outputs, targets, K_ONE2MANY, criterion, LAMBDA_ONE2MANY)
    total = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
    total.backward()

    sets = prediction_sets(outputs)
    if len(matcher.calls) != len(sets):
        raise RuntimeError(f"expected {len(sets)} matcher calls, got {len(matcher.calls)}")
    arrays = {}
    for name, pred in sets.items():
        arrays.update({f"{name}.{k}": v for k, v in pred.items()})
        for k, v in pred.items():
            if name != "enc" or k in GRAD_ENC:
                arrays[f"grad.{name}.{k}"] = v.grad if v.grad is not None else torch.zeros_like(v)
    for b, t in enumerate(targets):
        arrays[f"targets.{b}.boxes"] = t["boxes"]
        arrays[f"targets.{b}.labels"] = t["labels"]
    for name, indices in zip(sets, matcher.calls):
        for b, (q, t) in enumerate(indices):
            arrays[f"indices.{name}.{b}"] = torch.stack([q, t])
    terms = [k for k in weight_dict if k in loss_dict]  # the one-to-many branch has no encoder outputs
    for k in terms:
        arrays[f"loss.{k}"] = torch.as_tensor(loss_dict[k], dtype=torch.float32)
        arrays[f"weight.{k}"] = torch.tensor(weight_dict[k], dtype=torch.float32)
    arrays["total"] = torch.as_tensor(total, dtype=torch.float32)

    args.out.mkdir(parents=True, exist_ok=True)
    save_arrays(arrays, args.out / "loss.npz")
    config = dict(images=IMAGES, num_boxes=NUM_BOXES, num_classes=K, num_queries_one2one=Q1,
                  num_queries_one2many=Q2, dec_layers=L, k_one2many=K_ONE2MANY, lambda_one2many=LAMBDA_ONE2MANY,
                  focal_alpha=FOCAL_ALPHA, **COSTS, **COEFS, plain_detr_commit="6ad930b")
    (args.out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {args.out} ({len(arrays)} arrays); total loss {total.item():.6f}")
    for k in sorted(terms):
        print(f"  {k}: {float(loss_dict[k]):.6f}")


if __name__ == "__main__":
    main()
