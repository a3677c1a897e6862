"""heads/seg_losses.py: each loss equals smp's (ignore index included), weighted sums, Meta's CE averaging."""

import math
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from heads import LinearSegHead
from heads.seg_losses import LOSS_NAMES, SegLoss
from reference_arrays import load_arrays

FIXTURES = Path(__file__).parent / "fixtures" / "meta" / "seg_loss"
SMP_CLASSES = {"dice": smp.losses.DiceLoss, "focal": smp.losses.FocalLoss, "lovasz": smp.losses.LovaszLoss,
               "tversky": smp.losses.TverskyLoss, "jaccard": smp.losses.JaccardLoss}


def _inputs(seed: int = 0, classes: int = 5):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 16, 20, generator=gen) * 2
    mask = torch.randint(0, classes, (2, 16, 20), generator=gen)
    mask[torch.rand(mask.shape, generator=gen) < 0.3] = 255
    mask[0, :, :4] = 255
    return logits, mask


@pytest.mark.parametrize("name", list(SMP_CLASSES))
def test_each_smp_loss_equals_smp_with_ignore_index(name):
    logits, mask = _inputs()
    options = {"focal": {"gamma": 3.0}, "tversky": {"alpha": 0.3, "beta": 0.7}}.get(name, {})
    ours = SegLoss(name, loss_options={name: options} if options else None)(logits, mask)
    assert list(ours) == [f"loss_{name}"]
    reference = SMP_CLASSES[name](mode="multiclass", ignore_index=255, **options)(logits, mask)
    torch.testing.assert_close(ours[f"loss_{name}"], reference, atol=1e-6, rtol=0)
    # ignored pixels really are ignored: changing their logits changes nothing
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[mask == 255] = torch.randn(int((mask == 255).sum()), logits.shape[1]) * 10
    torch.testing.assert_close(SegLoss(name, loss_options={name: options} if options else None)(changed, mask)[f"loss_{name}"],
                               reference, atol=1e-6, rtol=0)


def test_ce_averages_over_labelled_pixels_by_default_and_over_all_pixels_for_meta():
    # hand-worked: equal logits over 2 classes -> every labelled pixel costs ln 2; 2 of 4 pixels labelled
    logits = torch.zeros(1, 2, 2, 2)
    mask = torch.tensor([[[0, 1], [255, 255]]])
    ours = SegLoss("ce")(logits, mask)["loss_ce"]
    meta = SegLoss("ce", avg_non_ignore=False)(logits, mask)["loss_ce"]
    assert math.isclose(float(ours), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(meta), 2 * math.log(2) / 4, rel_tol=1e-6)
    # ours equals torch's mean cross-entropy with ignore_index
    logits, mask = _inputs()
    torch.testing.assert_close(SegLoss("ce")(logits, mask)["loss_ce"], F.cross_entropy(logits, mask, ignore_index=255))


def test_ce_matches_meta_loss_module_fixture():
    data = load_arrays(FIXTURES / "seg_loss.npz")
    logits, labels = data["logits"], data["labels"].long()
    meta = SegLoss("ce", avg_non_ignore=False)(logits, labels)["loss_ce"]  # resizes the logits to the labels as Meta does
    ours = SegLoss("ce", avg_non_ignore=True)(logits, labels)["loss_ce"]
    torch.testing.assert_close(meta, data["loss_meta"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, data["loss_meta_non_ignore"][0], atol=1e-6, rtol=0)
    assert float(data["loss_meta_all_ignored"][0]) == 0.0
    assert float(SegLoss("ce", avg_non_ignore=False)(logits, torch.full_like(labels, 255))["loss_ce"]) == 0.0


def test_weighted_combinations_list_and_dict():
    logits, mask = _inputs(1)
    single = {n: SegLoss(n)(logits, mask)[f"loss_{n}"] for n in ("ce", "lovasz", "dice")}
    by_list = SegLoss(["ce", "lovasz", "dice"], [1.0, 0.5, 2.0])(logits, mask)
    by_dict = SegLoss(["ce", "lovasz", "dice"], {"dice": 2.0, "ce": 1.0, "lovasz": 0.5})(logits, mask)
    by_loss_dict = SegLoss({"ce": 1.0, "lovasz": 0.5, "dice": 2.0})(logits, mask)
    expected = {"loss_ce": single["ce"], "loss_lovasz": 0.5 * single["lovasz"], "loss_dice": 2.0 * single["dice"]}
    for result in (by_list, by_dict, by_loss_dict):
        assert list(result) == list(expected)
        for key in expected:
            torch.testing.assert_close(result[key], expected[key])


def test_all_losses_give_gradients_and_zero_without_labels():
    logits, mask = _inputs(2)
    logits.requires_grad_(True)
    losses = SegLoss(list(LOSS_NAMES))(logits, mask)
    sum(losses.values()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    empty = SegLoss(list(LOSS_NAMES))(logits, torch.full_like(mask, 255))
    assert all(float(v.detach()) == 0.0 and v.requires_grad for v in empty.values())


@pytest.mark.parametrize("kwargs, match", [
    ({"loss": "bce"}, "expected distinct names"),
    ({"loss": ["ce", "ce"]}, "expected distinct names"),
    ({"loss": ["ce", "dice"], "loss_weights": [1.0]}, "one weight per loss"),
    ({"loss": ["ce", "dice"], "loss_weights": {"ce": 1.0}}, "must be the loss names"),
    ({"loss": {"ce": 1.0}, "loss_weights": [1.0]}, "not both"),
    ({"loss": "ce", "loss_options": {"focal": {"gamma": 2.0}}}, "not in loss"),
])
def test_bad_loss_config_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegLoss(**kwargs)


def test_linear_seg_head_uses_the_configured_losses():
    logits, mask = _inputs(3)
    head = LinearSegHead([8], [16], 5, loss=["ce", "focal"], loss_weights=[1.0, 0.25], avg_non_ignore=False)
    losses = head.loss(logits[..., :4, :5], {"mask": mask})
    expected = SegLoss(["ce", "focal"], [1.0, 0.25], avg_non_ignore=False)(logits[..., :4, :5], mask)
    assert list(losses) == ["loss_ce", "loss_focal"]
    for key in losses:
        torch.testing.assert_close(losses[key], expected[key])
    default = LinearSegHead([8], [16], 5).loss(logits[..., :4, :5], {"mask": mask})
    upsampled = F.interpolate(logits[..., :4, :5], mask.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(default["loss_ce"], F.cross_entropy(upsampled, mask, ignore_index=255))
