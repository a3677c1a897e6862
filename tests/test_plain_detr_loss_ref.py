"""Our matcher and criterion against Plain-DETR's, the training loss of Meta's detector (Meta released none).

The fixture (``tests/fixtures/meta/detr_loss/``, written by ``tools/meta_fixtures/plain_detr_loss.py`` from
upstream Plain-DETR at 6ad930b) holds seeded outputs shaped as ``PlainDETRReParam`` emits them in training
(2 padded images with 3 and 5 boxes in pixels, 20 + 20 queries, 3 decoder layers, 4 proposal levels), the
indices of every matcher call of Plain-DETR's ``SetCriterion`` / ``train_hybrid`` and every loss term.

Names: Plain-DETR's loss dict keeps one unweighted term per prediction set, ``loss_ce`` (sigmoid focal),
``loss_bbox`` (L1 of deltas), ``loss_giou``, suffixed ``_{i}`` (decoder layer ``i``), ``_enc`` (encoder
proposals), ``_one2many`` (one-to-many queries, times ``lambda_one2many``); the weights are applied when summing.
Ours: ``SetCriterion.single`` gives the unweighted ``loss_focal`` / ``loss_bbox`` / ``loss_giou`` of one set, and
``SetCriterion.forward`` (``PlainDETRHead.loss``) returns them weighted and summed over the sets of a branch:
``loss_focal = w_class * (loss_ce + sum_i loss_ce_{i} + loss_ce_enc)`` and ``loss_focal_one2many = w_class *
(loss_ce_one2many + sum_i loss_ce_{i}_one2many)`` (the same for ``loss_bbox`` / ``loss_giou``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_convert

from heads.detr import PlainDETRHead
from heads.detr.criterion import SetCriterion
from heads.detr.matcher import HungarianMatcher
from tests.reference_arrays import load_arrays

FIXTURES = Path(__file__).parent / "fixtures" / "meta" / "detr_loss"
TOL = 1e-5
OURS = {"loss_ce": "loss_focal", "loss_bbox": "loss_bbox", "loss_giou": "loss_giou"}


@pytest.fixture(scope="module")
def ref():
    arrays = load_arrays(FIXTURES / "loss.npz")
    config = json.loads((FIXTURES / "config.json").read_text())
    return arrays, config


def _targets(arrays: dict, agnostic: bool = False, repeat: int = 1) -> list[dict]:
    out = []
    for b in range(2):
        labels = arrays[f"targets.{b}.labels"]
        out.append({"boxes": arrays[f"targets.{b}.boxes"].repeat(repeat, 1),
                    "labels": (torch.zeros_like(labels) if agnostic else labels).repeat(repeat)})
    return out


def _set_names(config: dict) -> list[str]:
    aux = [f"aux{i}" for i in range(config["dec_layers"] - 1)]
    return ["final", *aux, "enc", "final_one2many", *[a + "_one2many" for a in aux]]


def _set(arrays: dict, name: str) -> dict:
    keys = ("pred_logits", "pred_boxes", "pred_boxes_old", "pred_deltas")
    return {k: arrays[f"{name}.{k}"] for k in keys}


def _ref_suffix(name: str) -> str:
    """Plain-DETR's key suffix of a prediction set: ``final`` -> ``""``, ``aux1`` -> ``_1``, ``enc`` -> ``_enc``."""
    base, one2many = name.removesuffix("_one2many"), name.endswith("_one2many")
    suffix = {"final": "", "enc": "_enc"}.get(base, "_" + base.removeprefix("aux"))
    return suffix + ("_one2many" if one2many else "")


def _set_targets(arrays: dict, config: dict, name: str) -> list[dict]:
    if name.endswith("_one2many"):
        return _targets(arrays, repeat=config["k_one2many"])
    return _targets(arrays, agnostic=name == "enc")


def _criterion(config: dict) -> SetCriterion:
    """Ours with Plain-DETR's reparam weights, read from the fixture's config (as ``PlainDETRHead`` builds it)."""
    matcher = HungarianMatcher(config["set_cost_class"], config["set_cost_bbox"], config["set_cost_giou"],
                               config["focal_alpha"])
    return SetCriterion(matcher, config["cls_loss_coef"], config["bbox_loss_coef"], config["giou_loss_coef"],
                        config["focal_alpha"], class_agnostic_proposals=True,
                        one_to_many_weight=config["lambda_one2many"])


def test_matcher_indices_equal_plain_detr(ref):
    arrays, config = ref
    matcher = _criterion(config).matcher
    for name in _set_names(config):
        pred = _set(arrays, name)
        indices = matcher(pred["pred_logits"], pred["pred_boxes"], _set_targets(arrays, config, name),
                          pred_deltas=pred["pred_deltas"], references=pred["pred_boxes_old"])
        for b, (q, t) in enumerate(indices):
            expected = arrays[f"indices.{name}.{b}"]
            assert torch.equal(torch.stack([q, t]), expected), f"{name}, image {b}"


def test_each_loss_term_equals_plain_detr(ref):
    arrays, config = ref
    criterion = _criterion(config)
    n = sum(len(arrays[f"targets.{b}.labels"]) for b in range(2))
    for name in _set_names(config):
        one2many = name.endswith("_one2many")
        num_boxes = torch.tensor(float(n * config["k_one2many"] if one2many else n))
        ours = criterion.single(_set(arrays, name), _set_targets(arrays, config, name), num_boxes)
        factor = config["lambda_one2many"] if one2many else 1.0
        for ref_name, our_name in OURS.items():
            key = ref_name + _ref_suffix(name)
            got, expected = factor * ours[our_name].item(), arrays[f"loss.{key}"].item()
            assert abs(got - expected) <= TOL, f"{key}: {got} vs {expected}"


def _head_outputs(sets: dict[str, dict], config: dict) -> dict:
    """The prediction sets as ``PlainDETRHead.forward`` returns them in training."""
    aux = range(config["dec_layers"] - 1)
    out = dict(sets["final"])
    out.update({k + "_one2many": v for k, v in sets["final_one2many"].items()})
    out["aux_outputs"] = [sets[f"aux{i}"] for i in aux]
    out["aux_outputs_one2many"] = [sets[f"aux{i}_one2many"] for i in aux]
    out["enc_outputs"] = sets["enc"]
    return out


@pytest.fixture(scope="module")
def head_losses(ref):
    """``PlainDETRHead.loss`` on the fixture, with the head's default (Meta recipe) weights, k and lambda; the
    predictions are leaves, so the gradients can be compared."""
    arrays, config = ref
    head = PlainDETRHead([32], [16], num_classes=config["num_classes"], hidden_dim=32, num_heads=2, enc_layers=1,
                         enc_ffn_dim=32, dec_layers=config["dec_layers"], dec_ffn_dim=32, rpe_hidden_dim=16,
                         num_queries=config["num_queries_one2one"],
                         num_queries_one2many=config["num_queries_one2many"])
    sets = {name: {k: v.clone().requires_grad_() for k, v in _set(arrays, name).items()} for name in _set_names(config)}
    targets = _targets(arrays)
    losses = head.loss(_head_outputs(sets, config), {
        "boxes": [box_convert(t["boxes"], "cxcywh", "xyxy") for t in targets],
        "labels": [t["labels"] for t in targets]})
    sum(losses.values()).backward()
    return losses, sets


def test_head_loss_equals_plain_detr_weighted_sums(ref, head_losses):
    """Each of our weighted sums and the total equal Plain-DETR's weighted terms summed the same way (a sum of up
    to 4 terms: tolerance ``10 * TOL``)."""
    arrays, _ = ref
    losses, _ = head_losses
    assert set(losses) == {v + b for v in OURS.values() for b in ("", "_one2many")}
    terms = {k.removeprefix("loss."): v.item() for k, v in arrays.items() if k.startswith("loss.")}
    weights = {k.removeprefix("weight."): v.item() for k, v in arrays.items() if k.startswith("weight.")}
    for ref_name, our_name in OURS.items():
        for branch in ("", "_one2many"):
            expected = sum(weights[k] * v for k, v in terms.items()
                           if k.startswith(ref_name) and k.endswith("_one2many") == bool(branch))
            got = losses[our_name + branch].item()
            assert abs(got - expected) <= 10 * TOL, f"{our_name + branch}: {got} vs {expected}"
    total, expected = sum(v.item() for v in losses.values()), arrays["total"].item()
    assert abs(total - expected) <= 1e-6 * abs(expected), (total, expected)


def test_head_loss_gradients_equal_plain_detr(ref, head_losses):
    """The gradient of the total (what training backpropagates) w.r.t. every prediction of the decoder sets and
    the encoder's boxes / deltas."""
    arrays, config = ref
    _, sets = head_losses
    grads = {k.removeprefix("grad."): v for k, v in arrays.items() if k.startswith("grad.")}
    assert len(grads) == 4 * 2 * config["dec_layers"] + 2
    for key, expected in grads.items():
        name, pred_key = key.rsplit(".", 1)
        got = sets[name][pred_key].grad
        got = torch.zeros_like(expected) if got is None else got
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")
