"""DETR head: matcher vs brute force, losses vs hand-worked values, shapes, gradients, overfit, 2-process DDP."""

import itertools
import math
import os
import socket
import time

import pytest
import torch
from torchvision.ops import box_iou

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backbones.features import Features  # noqa: E402
from heads.detr import DETRHead, HungarianMatcher, SetCriterion  # noqa: E402
from heads.detr.criterion import box_losses, focal_loss  # noqa: E402
from heads.detr.matcher import focal_class_cost, giou_box_cost, l1_box_cost  # noqa: E402
from heads.ops import MSDeformAttn  # noqa: E402

TINY = dict(hidden_dim=32, num_queries=6, enc_layers=2, dec_layers=2, num_heads=4, num_levels=2, ffn_dim=64)


def vit_features(b=2, h=5, w=7, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, c, h, w, generator=g) for _ in range(4)]
    return Features(maps, None, [16] * 4, [c] * 4, 16, (h * 16, w * 16))


def convnext_features(b=2, size=(72, 104), chans=(16, 24, 32, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    strides = [4, 8, 16, 32]
    maps = [
        torch.randn(b, c, math.ceil(size[0] / s), math.ceil(size[1] / s), generator=g) for c, s in zip(chans, strides)
    ]
    return Features(maps, None, strides, list(chans), 4, size)


def rand_boxes(n, g):
    """``(n, 4)`` valid cxcywh boxes inside the unit square."""
    wh = torch.rand(n, 2, generator=g) * 0.4 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    return torch.cat([c, wh], 1)


# ---------------------------------------------------------------- matcher
def test_cost_terms_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 0.5, 0.75
    labels = torch.tensor([0, 1])
    c = focal_class_cost(logits, labels)
    p = 0.75
    want1 = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    assert c[0, 0].item() == pytest.approx(-0.125 * math.log(2), abs=1e-6)
    assert c[0, 1].item() == pytest.approx(want1, abs=1e-6)
    a = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # xyxy 0.4 0.4 0.6 0.6
    b = torch.tensor([[0.6, 0.5, 0.2, 0.4]])  # xyxy 0.5 0.3 0.7 0.7
    assert l1_box_cost(a, b).item() == pytest.approx(0.3, abs=1e-6)
    # inter 0.02, union 0.10, iou 0.2, hull 0.12: giou = 0.2 - 0.02 / 0.12
    assert giou_box_cost(a, b).item() == pytest.approx(-(0.2 - 1 / 6), abs=1e-6)
    m = HungarianMatcher()
    total = m.cost_matrix(torch.tensor([[0.0, 0.0]]), a, torch.tensor([0]), b)
    assert total.item() == pytest.approx(2 * -0.125 * math.log(2) + 5 * 0.3 + 2 * -(0.2 - 1 / 6), abs=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("q,n", [(5, 3), (4, 4), (3, 5)])
def test_matcher_is_optimal(seed, q, n):
    g = torch.Generator().manual_seed(seed)
    k = 4
    logits = torch.randn(1, q, k, generator=g) * 2
    boxes = rand_boxes(q, g)[None]
    tgt = {"labels": torch.randint(0, k, (n,), generator=g), "boxes": rand_boxes(n, g)}
    m = HungarianMatcher()
    ((rows, cols),) = m(logits, boxes, [tgt])
    cost = m.cost_matrix(logits[0], boxes[0], tgt["labels"], tgt["boxes"])
    assert len(rows) == min(q, n) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    got = cost[rows, cols].sum().item()
    if q >= n:
        best = min(sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(q), n))
    else:
        best = min(sum(cost[i, p[i]].item() for i in range(q)) for p in itertools.permutations(range(n), q))
    assert got == pytest.approx(best, abs=1e-5)


# ---------------------------------------------------------------- losses
def focal_hand():
    """Focal loss of logits [[0, ln3], [-ln3, 0]] with one positive at (query 0, class 1), summed."""
    l2, l43 = math.log(2), math.log(4 / 3)
    neg_half = 0.75 * 0.25 * l2  # p = 0.5 negative
    pos_3q = 0.25 * 0.0625 * l43  # p = 0.75 positive
    neg_q = 0.75 * 0.0625 * l43  # p = 0.25 negative
    return 2 * neg_half + pos_3q + neg_q


LOGITS = torch.tensor([[[0.0, math.log(3.0)], [-math.log(3.0), 0.0]]])
A = [0.5, 0.5, 0.2, 0.2]
B = [0.6, 0.5, 0.2, 0.4]
FAR = [0.05, 0.05, 0.02, 0.02]


def test_focal_loss_by_hand():
    idx = [(torch.tensor([0]), torch.tensor([0]))]
    labels = [torch.tensor([1])]
    got = focal_loss(LOGITS, labels, idx, torch.tensor(1.0), 0.25, 2.0)
    assert got.item() == pytest.approx(focal_hand(), abs=1e-6)
    got2 = focal_loss(LOGITS, labels, idx, torch.tensor(2.0), 0.25, 2.0)
    assert got2.item() == pytest.approx(focal_hand() / 2, abs=1e-6)


def test_box_losses_by_hand():
    pred = torch.tensor([[A, FAR]])
    idx = [(torch.tensor([0]), torch.tensor([0]))]
    l1, giou = box_losses(pred, [torch.tensor([B])], idx, torch.tensor(1.0))
    assert l1.item() == pytest.approx(0.3, abs=1e-6)
    assert giou.item() == pytest.approx(1 - (0.2 - 1 / 6), abs=1e-6)
    l1, giou = box_losses(pred, [torch.tensor([B])], idx, torch.tensor(4.0))
    assert l1.item() == pytest.approx(0.3 / 4, abs=1e-6)
    assert giou.item() == pytest.approx((1 - (0.2 - 1 / 6)) / 4, abs=1e-6)


def test_criterion_weights_aux_and_num_boxes():
    crit = SetCriterion(HungarianMatcher())
    want = {"loss_focal": 2 * focal_hand(), "loss_bbox": 5 * 0.3, "loss_giou": 2 * (1 - (0.2 - 1 / 6))}
    boxes = torch.tensor([[A, FAR]])
    tgt = {"labels": torch.tensor([1]), "boxes": torch.tensor([B])}
    out = crit({"pred_logits": LOGITS, "pred_boxes": boxes}, [tgt])
    for k, v in want.items():
        assert out[k].item() == pytest.approx(v, abs=1e-5), k
    # one aux layer with the same predictions doubles every term
    out = crit(
        {"pred_logits": LOGITS, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": LOGITS, "pred_boxes": boxes}]},
        [tgt],
    )
    for k, v in want.items():
        assert out[k].item() == pytest.approx(2 * v, abs=1e-5), k
    # two identical images: sums double and num_boxes doubles -> same values
    out = crit({"pred_logits": LOGITS.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)}, [tgt, tgt])
    assert crit.last_num_boxes == 2.0
    for k, v in want.items():
        assert out[k].item() == pytest.approx(v, abs=1e-5), k
    # an extra image with no boxes and confident negatives adds ~nothing and keeps num_boxes = 1
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    logits = torch.cat([LOGITS, torch.full_like(LOGITS, -30.0)])
    out = crit({"pred_logits": logits, "pred_boxes": boxes.repeat(2, 1, 1)}, [tgt, empty])
    assert crit.last_num_boxes == 1.0
    for k, v in want.items():
        assert out[k].item() == pytest.approx(v, abs=1e-5), k
    # all images empty: num_boxes clamps to 1, box terms are zero
    out = crit({"pred_logits": LOGITS, "pred_boxes": boxes}, [empty])
    assert crit.last_num_boxes == 1.0
    assert out["loss_bbox"].item() == 0 and out["loss_giou"].item() == 0
    all_neg = 2 * 0.75 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4) + 0.75 * 0.0625 * math.log(4 / 3)
    assert out["loss_focal"].item() == pytest.approx(2 * all_neg, abs=1e-5)


def test_head_loss_converts_pixel_xyxy():
    """head.loss must equal the criterion on boxes converted to normalised cxcywh by hand."""
    torch.manual_seed(0)
    head = DETRHead([64] * 4, [16] * 4, 3, **TINY).eval()
    f = vit_features(b=1)
    out = head(f, (80, 112))
    px = torch.tensor([[11.2, 8.0, 44.8, 40.0]])  # cxcywh/size = (0.25, 0.3, 0.3, 0.4)
    got = head.loss(out, {"boxes": [px], "labels": [torch.tensor([2])]})
    ref = head.criterion(out, [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.25, 0.3, 0.3, 0.4]])}])
    for k in ref:
        assert got[k].item() == pytest.approx(ref[k].item(), rel=1e-5)


# ---------------------------------------------------------------- deformable attention
def test_msdeformattn_samples_reference_cell():
    """Zero offsets, one point, identity projections: output = mean over levels of the value at the reference cell."""
    attn = MSDeformAttn(8, 2, 2, 1)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(8))
            lin.bias.zero_()
    shapes = [(4, 6), (2, 3)]
    lv = [torch.randn(1, h * w, 8) for h, w in shapes]
    # cell (row 1, col 2) of level 0 and cell (row 0, col 1) of level 1 have centres at these normalised points
    ref = torch.tensor([[[[2.5 / 6, 1.5 / 4], [1.5 / 3, 0.5 / 2]]]])
    out = attn(torch.randn(1, 1, 8), ref, torch.cat(lv, 1), shapes)
    want = (lv[0][0, 1 * 6 + 2] + lv[1][0, 0 * 3 + 1]) / 2
    assert torch.allclose(out[0, 0], want, atol=1e-5)


# ---------------------------------------------------------------- head shapes / gradients
@pytest.mark.parametrize("kind", ["vit", "convnext"])
@pytest.mark.parametrize("two_stage,box_refine", [(True, True), (False, False)])
def test_shapes(kind, two_stage, box_refine):
    torch.manual_seed(0)
    if kind == "vit":
        f, size = vit_features(h=5, w=7), (80, 112)
    else:
        f, size = convnext_features(size=(72, 104)), (72, 104)
    head = DETRHead(f.channels, f.strides, 5, two_stage=two_stage, box_refine=box_refine, topk=7, **TINY)
    out = head(f, size)
    assert out["pred_logits"].shape == (2, 6, 5) and out["pred_boxes"].shape == (2, 6, 4)
    assert len(out["aux_outputs"]) == 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    if two_stage:
        s = out["enc_outputs"]["pred_logits"].shape[1]
        # levels at strides 8 and 16
        assert s == math.ceil(size[0] / 8) * math.ceil(size[1] / 8) + math.ceil(size[0] / 16) * math.ceil(size[1] / 16)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, s, 4)
    else:
        assert "enc_outputs" not in out
    preds = head.predict(out, size)
    assert len(preds) == 2
    for p in preds:
        assert p["boxes"].shape == (7, 4) and p["scores"].shape == (7,) and p["labels"].shape == (7,)
        assert (p["scores"][:-1] >= p["scores"][1:]).all()
        assert (p["boxes"][:, 2:] >= p["boxes"][:, :2]).all()
        assert (p["boxes"][:, [0, 2]] <= size[1] + 1e-3).all() and (p["boxes"][:, [1, 3]] <= size[0] + 1e-3).all()
    # predict = top-k over (query, class) sigmoid scores
    prob = out["pred_logits"][0].sigmoid().flatten()
    assert torch.allclose(preds[0]["scores"], prob.sort(descending=True).values[:7])


def test_float32_under_autocast():
    head = DETRHead([64] * 4, [16] * 4, 3, **TINY)
    f = vit_features(b=1)
    f.maps = [m.bfloat16() for m in f.maps]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(f, (80, 112))
    assert out["pred_logits"].dtype == torch.float32 and out["pred_boxes"].dtype == torch.float32


def test_predict_by_hand():
    head = DETRHead([8], [16], 2, **{**TINY, "num_levels": 1}, topk=2)
    logits = torch.tensor([[[0.0, 3.0], [2.0, -1.0], [-5.0, -5.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0], [0.1, 0.1, 0.1, 0.1]]])
    p = head.predict({"pred_logits": logits, "pred_boxes": boxes}, (100, 200))[0]
    assert p["labels"].tolist() == [1, 0]
    assert torch.allclose(p["scores"], torch.tensor([3.0, 2.0]).sigmoid())
    assert torch.allclose(p["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 100.0]]))


def targets_px(boxes_norm, labels, size):
    H, W = size
    out_b = []
    for b in boxes_norm:
        b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
        out_b.append(b * torch.tensor([W, H, W, H]))
    return {"boxes": out_b, "labels": [torch.as_tensor(x, dtype=torch.long) for x in labels]}


@pytest.mark.parametrize("empty", ["some", "all"])
def test_every_parameter_gets_gradient(empty):
    torch.manual_seed(0)
    f = vit_features(b=2)
    head = DETRHead(f.channels, f.strides, 4, one_to_many_k=2, num_queries_one2many=5, **TINY).train()
    out = head(f, (80, 112))
    assert out["pred_logits_one2many"].shape == (2, 5, 4) and len(out["aux_outputs_one2many"]) == 1
    if empty == "some":
        tg = targets_px([[[0.1, 0.2, 0.5, 0.6]], []], [[1], []], (80, 112))
    else:
        tg = targets_px([[], []], [[], []], (80, 112))
    losses = head.loss(out, tg)
    assert set(losses) == {f"loss_{k}{s}" for k in ("focal", "bbox", "giou") for s in ("", "_one2many")}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing, missing
    # one-to-many queries exist only in training
    head.eval()
    assert "pred_logits_one2many" not in head(f, (80, 112))


def test_one_to_many_queries_do_not_see_one_to_one():
    """The self-attention mask keeps groups apart: one-to-one outputs equal those of an eval-mode forward."""
    torch.manual_seed(0)
    f = vit_features(b=1)
    head = DETRHead(f.channels, f.strides, 4, one_to_many_k=2, num_queries_one2many=5, **TINY)
    train_out = head.train()(f, (80, 112))
    eval_out = head.eval()(f, (80, 112))
    assert torch.allclose(train_out["pred_boxes"], eval_out["pred_boxes"], atol=1e-5)
    assert torch.allclose(train_out["pred_logits"], eval_out["pred_logits"], atol=1e-5)


def test_overfit_tiny_batch():
    torch.manual_seed(0)
    size = (64, 64)
    f = Features([torch.randn(2, 32, 4, 4) for _ in range(4)], None, [16] * 4, [32] * 4, 16, size)
    head = DETRHead(f.channels, f.strides, 3, **{**TINY, "num_queries": 5})
    tg = targets_px([[[0.1, 0.1, 0.5, 0.6], [0.55, 0.5, 0.95, 0.9]], [[0.2, 0.3, 0.8, 0.7]]], [[0, 2], [1]], size)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.0)

    def top_iou():
        head.eval()
        with torch.no_grad():
            p = head.predict(head(f, size), size)[1]
        head.train()
        return box_iou(p["boxes"][:1], tg["boxes"][1]).item(), p["labels"][0].item()

    iou0, _ = top_iou()
    first = None
    for _ in range(120):
        loss = sum(head.loss(head(f, size), tg).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    iou1, label1 = top_iou()
    assert loss.item() < 0.3 * first, (first, loss.item())
    assert iou1 > 0.7 and iou1 > iou0 + 0.2, (iou0, iou1)
    assert label1 == 1


# ---------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, outdir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        f = vit_features(b=1, seed=rank)
        head = DETRHead(f.channels, f.strides, 4, one_to_many_k=2, num_queries_one2many=5, **TINY)
        model = torch.nn.parallel.DistributedDataParallel(head)
        out = model(f, (80, 112))
        if rank == 0:
            tg = targets_px(
                [[[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.9, 0.8], [0.0, 0.0, 0.3, 0.3]]], [[1, 2, 3]], (80, 112)
            )
        else:
            tg = targets_px([[]], [[]], (80, 112))
        losses = head.loss(out, tg)
        sum(losses.values()).backward()
        grads = torch.cat([p.grad.flatten() for p in head.parameters()])
        torch.save(
            {
                "num_boxes": head.criterion.last_num_boxes,
                "grad": grads,
                "missing": [p.grad is None for p in head.parameters()],
            },
            os.path.join(outdir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_with_empty_image(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.time() + 120
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                pytest.fail("DDP run hung")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["num_boxes"] == r1["num_boxes"] == 1.5  # (3 + 0) / 2
    assert not any(r0["missing"]) and not any(r1["missing"])
    assert torch.allclose(r0["grad"], r1["grad"], atol=1e-6)  # DDP averaged the gradients
    assert r0["grad"].abs().sum() > 0
