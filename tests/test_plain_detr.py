"""Plain-DETR head: box re-parameterisation and the reparam matching cost / loss by hand and by brute force,
class-agnostic proposals, hybrid-matching weights, shapes, gradients and a short run that learns."""

import itertools
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backbones.features import Features  # noqa: E402
from heads.detr import HungarianMatcher, PlainDETRHead, SetCriterion  # noqa: E402
from heads.detr.box_reparam import MAX_LOG_SCALE, apply_deltas, box_deltas  # noqa: E402
from heads.detr.criterion import box_losses  # noqa: E402
from heads.detr.matcher import delta_l1_cost  # noqa: E402

TINY = dict(hidden_dim=32, num_heads=4, enc_layers=1, enc_ffn_dim=64, dec_layers=2, dec_ffn_dim=64,
            rpe_hidden_dim=16, num_queries=8, num_queries_one2many=12, one_to_many_k=2, proposal_min_size=16.0,
            enc_dropout=0.0, topk=20)


def vit_features(b=2, h=6, w=8, c=16, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Features([torch.randn(b, c, h, w, generator=g) for _ in range(n)], None, [16] * n, [c] * n, 16,
                    (h * 16, w * 16))


# ------------------------------------------------------------------ box re-parameterisation
def test_deltas_by_hand_and_round_trip():
    ref = torch.tensor([[50.0, 40.0, 20.0, 10.0]])
    tgt = torch.tensor([[54.0, 38.0, 40.0, 5.0]])
    want = [4 / 20.1, -2 / 10.1, math.log(40 / 20.1), math.log(5 / 10.1)]
    assert box_deltas(ref, tgt)[0].tolist() == pytest.approx(want, abs=1e-6)
    # apply_deltas inverts box_deltas (eps = 0)
    xyxy = apply_deltas(ref, box_deltas(ref, tgt, eps=0.0))
    assert xyxy[0].tolist() == pytest.approx([34.0, 35.5, 74.0, 40.5], abs=1e-4)
    # size changes are clamped to 1000/16, boxes clipped to the image
    big = apply_deltas(ref, torch.tensor([[0.0, 0.0, 10.0, 0.0]]), max_size=(60, 70))
    assert big[0].tolist() == pytest.approx([0.0, 35.0, 70.0, 45.0], abs=1e-4)
    assert MAX_LOG_SCALE == pytest.approx(math.log(1000 / 16))
    pairs = box_deltas(torch.rand(3, 4) * 50 + 1, tgt.expand(3, 4).clone(), all_pairs=True)
    assert pairs.shape == (3, 3, 4)


def test_reparam_cost_and_loss_by_hand():
    ref = torch.tensor([[50.0, 40.0, 20.0, 10.0]])
    tgt = torch.tensor([[54.0, 38.0, 40.0, 5.0]])
    pred = torch.tensor([[0.1, -0.2, 0.5, -0.5]])
    want = sum(abs(p - t) for p, t in zip(pred[0].tolist(), box_deltas(ref, tgt)[0].tolist()))
    assert delta_l1_cost(pred, ref, tgt).item() == pytest.approx(want, abs=1e-6)
    boxes = torch.tensor([[[52.0, 40.0, 30.0, 8.0]]])
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    l1, giou = box_losses(boxes, [tgt], indices, torch.tensor(2.0), pred[None], ref[None])
    assert l1.item() == pytest.approx(want / 2, abs=1e-6)
    # GIoU of xyxy (37, 36, 67, 44) and (34, 35.5, 74, 40.5): inter 30*4.5, union 240 + 200 - 135, hull 40*8.5
    iou = 135 / 305
    assert giou.item() == pytest.approx((1 - (iou - (340 - 305) / 340)) / 2, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reparam_matcher_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    q, n = 5, 3
    logits = torch.randn(1, q, 4, generator=g)
    refs = torch.cat([torch.rand(1, q, 2, generator=g) * 80 + 10, torch.rand(1, q, 2, generator=g) * 30 + 5], -1)
    deltas = torch.randn(1, q, 4, generator=g) * 0.3
    boxes = torch.cat([torch.rand(1, q, 2, generator=g) * 80 + 10, torch.rand(1, q, 2, generator=g) * 30 + 5], -1)
    tgt = {"labels": torch.randint(0, 4, (n,), generator=g),
           "boxes": torch.cat([torch.rand(n, 2, generator=g) * 80 + 10, torch.rand(n, 2, generator=g) * 30 + 5], -1)}
    matcher = HungarianMatcher(2.0, 1.0, 2.0)
    (rows, cols), = matcher(logits, boxes, [tgt], deltas, refs)

    def cost(i, j):  # each term written out for one pair
        p = logits[0, i, tgt["labels"][j]].sigmoid().item()
        c_cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
        r, t = refs[0, i].tolist(), tgt["boxes"][j].tolist()
        d = [(t[0] - r[0]) / (r[2] + 0.1), (t[1] - r[1]) / (r[3] + 0.1), math.log(t[2] / (r[2] + 0.1)),
             math.log(t[3] / (r[3] + 0.1))]
        c_l1 = sum(abs(a - b) for a, b in zip(deltas[0, i].tolist(), d))
        from torchvision.ops import box_convert, generalized_box_iou

        a = box_convert(boxes[0, i:i + 1], "cxcywh", "xyxy")
        b = box_convert(tgt["boxes"][j:j + 1], "cxcywh", "xyxy")
        return 2 * c_cls + c_l1 - 2 * generalized_box_iou(a, b).item()

    best = min(itertools.permutations(range(q), n), key=lambda perm: sum(cost(i, j) for j, i in enumerate(perm)))
    got = dict(zip(cols.tolist(), rows.tolist()))
    assert [got[j] for j in range(n)] == list(best)


def test_class_agnostic_proposals_and_one_to_many_weight():
    crit = SetCriterion(HungarianMatcher(), class_agnostic_proposals=True, one_to_many_weight=0.5)
    g = torch.Generator().manual_seed(0)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    enc_logits = torch.randn(1, 6, 3, generator=g)
    out = {"pred_logits": torch.randn(1, 4, 3, generator=g), "pred_boxes": box.expand(1, 4, 4).clone(),
           "enc_outputs": {"pred_logits": enc_logits, "pred_boxes": box.expand(1, 6, 4).clone()},
           "pred_logits_one2many": torch.randn(1, 4, 3, generator=g), "pred_boxes_one2many": box.expand(1, 4, 4)}
    targets = [{"labels": torch.tensor([2]), "boxes": box}]
    losses = crit(out, targets, one_to_many_k=1)
    alone = SetCriterion(HungarianMatcher())
    base = alone.single({"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}, targets,
                        torch.tensor(1.0))
    enc = alone.single(out["enc_outputs"], [{"labels": torch.tensor([0]), "boxes": box}], torch.tensor(1.0))
    assert losses["loss_focal"].item() == pytest.approx(2 * (base["loss_focal"] + enc["loss_focal"]).item(), rel=1e-6)
    many = alone.single({"pred_logits": out["pred_logits_one2many"], "pred_boxes": out["pred_boxes_one2many"]},
                        targets, torch.tensor(1.0))
    assert losses["loss_focal_one2many"].item() == pytest.approx(0.5 * 2 * many["loss_focal"].item(), rel=1e-6)


# ------------------------------------------------------------------ head
def test_shapes_gradients_and_query_groups():
    head = PlainDETRHead([16] * 4, [16] * 4, num_classes=3, **TINY)
    feats = vit_features()
    head.train()
    out = head(feats, feats.padded_size)
    assert out["pred_logits"].shape == (2, 8, 3) and out["pred_boxes_one2many"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 1 and out["enc_outputs"]["pred_boxes_old"].shape[-1] == 4
    targets = {"boxes": [torch.tensor([[10.0, 12.0, 50.0, 40.0]]), torch.zeros(0, 4)],
               "labels": [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]}
    losses = head.loss(out, targets)
    assert set(losses) == {"loss_focal", "loss_bbox", "loss_giou", "loss_focal_one2many", "loss_bbox_one2many",
                           "loss_giou_one2many"}
    sum(losses.values()).backward()
    assert head.query_embed.weight.grad[8:].abs().sum() > 0 and head.input_proj[0].weight.grad.abs().sum() > 0
    # one-to-one outputs do not depend on the one-to-many queries
    with torch.no_grad():
        head.eval()
        alone = head(feats, feats.padded_size)
    assert (alone["pred_logits"] - out["pred_logits"].detach()).abs().max() < 1e-5
    dets = head.predict(alone, feats.padded_size)
    assert dets[0]["boxes"].shape == (20, 4) and dets[0]["boxes"][:, 2].max() <= 128


def test_rejects_mixed_strides_and_too_few_proposals():
    with pytest.raises(ValueError, match="one stride"):
        PlainDETRHead([16, 32], [8, 16], 3, **TINY)
    head = PlainDETRHead([16] * 4, [16] * 4, 3, **dict(TINY, num_queries=500)).eval()
    with pytest.raises(ValueError, match="proposals"):
        head(vit_features(h=4, w=4), (64, 64))
    with pytest.raises(ValueError, match="larger images"):
        head(vit_features(h=2, w=2), (32, 32))


def test_short_training_learns():
    torch.manual_seed(0)
    head = PlainDETRHead([16] * 4, [16] * 4, num_classes=2, **TINY)
    feats = vit_features(b=1)
    targets = {"boxes": [torch.tensor([[16.0, 20.0, 60.0, 70.0], [70.0, 30.0, 120.0, 90.0]])],
               "labels": [torch.tensor([0, 1])]}
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    head.train()
    first = None
    for _ in range(40):
        losses = head.loss(head(feats, feats.padded_size), targets)
        total = sum(losses.values())
        first = first if first is not None else total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    assert total.item() < 0.6 * first


def test_detr_head_class_agnostic_proposals_rank_by_class_zero():
    from heads.detr import DETRHead

    torch.manual_seed(0)
    feats = vit_features(c=16)
    common = dict(hidden_dim=32, num_queries=6, enc_layers=1, dec_layers=1, num_heads=4, num_levels=2, ffn_dim=64)
    seen = {}
    for agnostic in (True, False):
        torch.manual_seed(0)
        head = DETRHead([16] * 4, [16] * 4, 3, class_agnostic_proposals=agnostic, **common).eval()
        assert head.criterion.class_agnostic_proposals == agnostic
        head.decoder.register_forward_pre_hook(lambda m, args: seen.__setitem__(agnostic, args[1]))
        with torch.no_grad():
            head.enc_class.weight.normal_()
            enc = head(feats, feats.padded_size)["enc_outputs"]
        score = enc["pred_logits"][..., 0] if agnostic else enc["pred_logits"].max(-1).values
        idx = score.topk(6, dim=1).indices
        want = torch.gather(enc["pred_boxes"], 1, idx[..., None].expand(-1, -1, 4))
        assert torch.allclose(seen[agnostic], want)
    assert not torch.allclose(seen[True], seen[False])


def test_rope_grid_follows_input_size_in_onnx(tmp_path):
    """timm's DINOv3 RoPE froze ``float(size)`` of the example into exported graphs (wrong angles at every other
    size: Meta's detector failed its ONNX check); ours stays symbolic and equals timm's in eager mode."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    from backbones import build_backbone

    rope = build_backbone("vit_test").model.rope
    for shape in [(4, 6), (7, 5), (13, 10)]:
        assert torch.equal(rope.get_embed(shape=shape), RotaryEmbeddingDinoV3.get_embed(rope, shape=shape))

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rope = rope

        def forward(self, x):
            return self.rope.get_embed(shape=[x.shape[2] // 16, x.shape[3] // 16])

    module = Embed().eval()
    dims = {2: 16 * torch.export.Dim("h", min=1, max=64), 3: 16 * torch.export.Dim("w", min=1, max=64)}
    torch.onnx.export(module, (torch.zeros(1, 3, 64, 96),), str(tmp_path / "rope.onnx"), dynamo=True,
                      input_names=["images"], dynamic_shapes={"x": dims})
    session = ort.InferenceSession(str(tmp_path / "rope.onnx"), providers=["CPUExecutionProvider"])
    x = torch.zeros(1, 3, 112, 80)
    out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert (out - module(x)).abs().max().item() < 1e-6


# ------------------------------------------------------------------ padding masks (batches of differently sized images)
def test_padding_mask_resampling_and_position_by_hand():
    from heads.detr.padding_mask import padding_mask, resize_mask
    from heads.detr.position_encoding import masked_sine_position_map, sine_position_map

    mask = padding_mask([(3, 5), (4, 2)], (4, 6))
    assert mask.tolist()[0] == [[False] * 5 + [True]] * 3 + [[True] * 6]
    assert mask[1, :, :2].logical_not().all() and mask[1, :, 2:].all()
    with pytest.raises(ValueError, match="5x2 pixels does not fit"):
        padding_mask([(5, 2)], (4, 6))
    # nearest: a 16-px cell is image when its first pixel is (90 px -> 6 cells, the last one partly image)
    cells = resize_mask(padding_mask([(90, 120)], (128, 176)), (8, 11))
    assert cells[0].logical_not().sum() == 6 * 8 and not cells[0, 5, 7] and cells[0, 6, 0] and cells[0, 0, 8]
    # valid cells are encoded relative to the valid extent; an all-valid mask is the unmasked encoding, bit for bit
    pos = masked_sine_position_map(resize_mask(padding_mask([(64, 96), (96, 128)], (96, 128)), (6, 8)), 32)
    assert torch.equal(pos[1], sine_position_map(6, 8, 32))
    assert torch.equal(pos[0].reshape(6, 8, 32)[:4, :6], sine_position_map(4, 6, 32).reshape(4, 6, 32))


def test_padded_batch_trains_and_all_valid_mask_is_no_mask():
    from heads.detr.padding_mask import padding_mask

    torch.manual_seed(0)
    head = PlainDETRHead([16] * 4, [16] * 4, num_classes=3, **TINY).train()
    feats = vit_features()
    plain = head(feats, feats.padded_size)
    feats.padding_mask = torch.zeros(2, *feats.padded_size, dtype=torch.bool)
    assert all(torch.equal(plain[k], v) for k, v in head(feats, feats.padded_size).items() if torch.is_tensor(v))
    feats.padding_mask = padding_mask([(96, 128), (70, 80)], feats.padded_size)  # 5 x 5 of 6 x 8 cells
    out = head(feats, feats.padded_size)
    assert not torch.equal(out["pred_logits"][1], plain["pred_logits"][1])
    assert out["pred_boxes"][1, :, 0].max() <= 80 and out["enc_outputs"]["pred_boxes"][1, :, 1].max() <= 80
    targets = {"boxes": [torch.tensor([[10.0, 12.0, 50.0, 40.0]]), torch.tensor([[5.0, 5.0, 60.0, 50.0]])],
               "labels": [torch.tensor([1]), torch.tensor([2])]}
    total = sum(head.loss(out, targets).values())
    assert torch.isfinite(total)
    total.backward()
    assert head.input_proj[0].weight.grad.abs().sum() > 0


def test_detection_training_batches_carry_their_padding():
    """Training crops of images smaller than the crop keep the image top-left (the flip comes before the padding),
    record it as ``meta["valid_size"]``, and the detection task turns it into the padding mask of the features."""
    import numpy as np

    from dense_data.synthetic import make_scene
    from dense_data.transforms import IMAGENET_MEAN, IMAGENET_STD, Transformed, collate, train_transform
    from tasks.detection import DetectionTask, batch_padding_mask

    scene = make_scene(0, size=(48, 64))
    scene["image"] = np.full_like(scene["image"], 200)
    pipeline = train_transform(("boxes",), crop_size=128, base_size=64, scale_range=(1.0, 1.0), photometric=False)
    dataset = Transformed([scene], pipeline, ("boxes",))
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    lefts = set()
    for seed in range(6):
        sample = dataset[(0, seed)]
        assert sample["meta"]["valid_size"] == (64, 85) and sample["image"].shape[-2:] == (128, 128)
        image = sample["image"]
        assert (image[:, :64, :85] > 0.5).all() and torch.allclose(image[:, 64:, :], black[:, None, None].expand(
            3, 64, 128)) and torch.allclose(image[:, :, 85:], black[:, None, None].expand(3, 128, 43))
        assert (sample["boxes"][:, 2] <= 85).all() and (sample["boxes"][:, 3] <= 64).all()
        lefts.add(round(sample["boxes"][:, 0].min().item()))
    assert len(lefts) == 2  # flipped and not flipped
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    task = DetectionTask(backbone={"name": "vit_test"}, head={"_target_": "heads.detr.PlainDETRHead", **TINY},
                         num_classes=3)
    features = task.training_features(batch)
    assert torch.equal(features.padding_mask, batch_padding_mask(batch["meta"], (128, 128)))
    assert features.padding_mask[:, 64:].all() and not features.padding_mask[:, :64, :85].any()
    assert batch_padding_mask([{"image_size": (128, 128)}] * 2, (128, 128)) is None
