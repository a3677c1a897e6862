"""Mask2Former matcher and loss: parity with transformers, ignored pixels, label maps to targets, and the mask
count averaged across processes."""

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from heads.mask2former import HungarianMatcher, Mask2FormerCriterion, semantic_to_targets
from heads.ops import average_over_processes

from mask2former_inputs import blocky_masks, one_thread  # noqa: F401  (one_thread: autouse)


# ---------------------------------------------------------------- parity with transformers


def _random_outputs(b=2, q=7, k=4, hw=(16, 16), layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = [
        {"pred_logits": torch.randn(b, q, k + 1, generator=g) * 2, "pred_masks": torch.randn(b, q, *hw, generator=g) * 3}
        for _ in range(layers)
    ]
    for o in outs:
        for t in o.values():
            t.requires_grad_(True)
    final = dict(outs[-1])
    final["aux_outputs"] = outs[:-1]
    return final


def test_matcher_matches_transformers():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerHungarianMatcher

    out = _random_outputs()
    targets = semantic_to_targets(blocky_masks(2, 64, 64, 4, seed=3), num_classes=4)
    assert all(len(t["labels"]) >= 2 for t in targets)
    ours_m = HungarianMatcher(2.0, 5.0, 5.0, num_points=500)
    ref_m = Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=500)
    for layer in [out] + out["aux_outputs"]:
        with torch.random.fork_rng():
            torch.manual_seed(11)
            ours = ours_m(layer["pred_logits"], layer["pred_masks"], targets)
            torch.manual_seed(11)
            ref = ref_m(
                masks_queries_logits=layer["pred_masks"],
                class_queries_logits=layer["pred_logits"],
                mask_labels=[t["masks"] for t in targets],
                class_labels=[t["labels"] for t in targets],
            )
        for (i, j), (ri, rj) in zip(ours, ref):
            assert torch.equal(i, ri) and torch.equal(j, rj)


def test_loss_terms_match_transformers():
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    k, points = 4, 300
    out = _random_outputs(k=k)
    targets = semantic_to_targets(blocky_masks(2, 64, 64, k, seed=5), num_classes=k)
    crit = Mask2FormerCriterion(k, num_points=points)
    cfg = Mask2FormerConfig(
        num_labels=k, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
        train_num_points=points, oversample_ratio=3.0, importance_sample_ratio=0.75,
    )
    ref_loss = Mask2FormerLoss(cfg, weight_dict={})
    with torch.random.fork_rng():
        torch.manual_seed(7)
        ours = crit.layer_terms(out, targets)
        torch.manual_seed(7)
        ref = ref_loss(
            masks_queries_logits=out["pred_masks"],
            class_queries_logits=out["pred_logits"],
            mask_labels=[t["masks"] for t in targets],
            class_labels=[t["labels"] for t in targets],
            auxiliary_predictions=[
                {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]} for a in out["aux_outputs"]
            ],
        )
        torch.manual_seed(7)
        weighted = crit(out, targets)
    names = {"ce": "loss_cross_entropy", "mask": "loss_mask", "dice": "loss_dice"}
    for layer, terms in enumerate(ours):
        suffix = "" if layer == 0 else f"_{layer - 1}"
        for ours_key, ref_key in names.items():
            torch.testing.assert_close(terms[ours_key], ref[ref_key + suffix], rtol=1e-5, atol=1e-6)
    ref_total = sum(w * sum(v for key, v in ref.items() if key.startswith(names[n])) for n, w in crit.weights.items())
    ours_total = sum(weighted.values())
    torch.testing.assert_close(ours_total, ref_total, rtol=1e-5, atol=1e-5)
    # gradients w.r.t. the predictions agree too
    leaves = [out["pred_logits"], out["pred_masks"]]
    g_ours = torch.autograd.grad(ours_total, leaves, retain_graph=True)
    g_ref = torch.autograd.grad(ref_total, leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- ignore handling


def test_ignored_pixels_do_not_count():
    k = 3
    out = _random_outputs(b=1, q=5, k=k, hw=(16, 16), layers=1)
    out.pop("aux_outputs")
    labels = blocky_masks(1, 64, 64, k, seed=2)
    ignored = labels.clone()
    ignored[:, :32] = 255  # top half ignored
    crit = Mask2FormerCriterion(k, num_points=400, importance_sample_ratio=0.0)  # uniform points

    def losses(masks, target):
        o = {"pred_logits": out["pred_logits"], "pred_masks": masks}
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return crit(o, semantic_to_targets(target, k))

    changed = out["pred_masks"].detach().clone()
    changed[:, :, :6] = torch.randn_like(changed[:, :, :6]) * 10  # rows far inside the ignored half
    base, moved = losses(out["pred_masks"], ignored), losses(changed, ignored)
    for key in base:
        torch.testing.assert_close(base[key], moved[key])
    # the same change matters when the top half is labelled (the test can fail)
    assert not torch.allclose(losses(out["pred_masks"], labels)["loss_mask"], losses(changed, labels)["loss_mask"])


def test_semantic_to_targets():
    m = torch.tensor([[[0, 0, 255], [2, 2, 255]]])
    (t,) = semantic_to_targets(m, num_classes=3)
    assert t["labels"].tolist() == [0, 2]
    assert t["masks"].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 0]]]
    assert t["valid"].tolist() == [[1, 1, 0], [1, 1, 0]]
    assert semantic_to_targets(torch.zeros(1, 2, 2, dtype=torch.long), 3)[0]["valid"] is None
    with pytest.raises(ValueError):
        semantic_to_targets(torch.full((1, 2, 2), 3), 3)


# ---------------------------------------------------------------- distributed num_masks


def test_average_num_masks_single_process():
    assert average_over_processes(3).item() == 3.0
    assert average_over_processes(0).item() == 1.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        local = 3 if rank == 0 else 1
        n = average_over_processes(local, "cpu").item()
        # a target with `local` classes; the mask terms are divided by the averaged count (2), not the local one
        mask = torch.zeros(1, 32, 32, dtype=torch.long)
        for c in range(local):
            mask[:, :, c * 8 :] = c
        targets = semantic_to_targets(mask, num_classes=4)
        out = _random_outputs(b=1, q=5, k=4, layers=2, hw=(8, 8), seed=rank)
        crit = Mask2FormerCriterion(4, num_points=64)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            dist_losses = crit(out, targets)
            torch.manual_seed(0)
            local_losses = crit(out, targets, num_masks=float(local))
        ratio = (dist_losses["loss_mask"] / local_losses["loss_mask"]).item()
        ratio_dice = (dist_losses["loss_dice"] / local_losses["loss_dice"]).item()
        same_ce = torch.allclose(dist_losses["loss_ce"], local_losses["loss_ce"])
        torch.save({"n": n, "ratio": ratio, "ratio_dice": ratio_dice, "same_ce": same_ce}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_num_masks_averaged_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["n"] == 2.0 and r1["n"] == 2.0
    assert r0["ratio"] == pytest.approx(3 / 2, rel=1e-5) and r0["ratio_dice"] == pytest.approx(3 / 2, rel=1e-5)
    assert r1["ratio"] == pytest.approx(1 / 2, rel=1e-5) and r1["ratio_dice"] == pytest.approx(1 / 2, rel=1e-5)
    assert r0["same_ce"] and r1["same_ce"]
