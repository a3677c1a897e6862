"""heads/ops/upsampled_ce.py: the fused upsample + cross-entropy equals F.interpolate + F.cross_entropy (value and
gradient); the point-sampled estimate is exact at its points and unbiased."""

import pytest
import torch
import torch.nn.functional as F

from heads import LinearSegHead
from heads.ops.upsampled_ce import bilinear_weights, sampled_cross_entropy, upsampled_cross_entropy
from heads.seg_losses import SegLoss


def _reference(logits, mask, avg_non_ignore):
    up = F.interpolate(logits, mask.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(up, mask, ignore_index=255, reduction="sum")
    return total / ((mask != 255).sum() if avg_non_ignore else mask.numel())


def _inputs(shape, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=gen) * 3
    mask = torch.randint(0, shape[1], (shape[0], *size), generator=gen)
    mask[torch.rand(mask.shape, generator=gen) < 0.3] = 255
    mask[0, : size[0] // 3] = 255
    return logits, mask


@pytest.mark.parametrize("shape,size,rows", [
    ((2, 7, 8, 8), (128, 128), None),  # 16x, one chunk
    ((2, 5, 4, 6), (17, 23), 3),       # odd factors, chunks of 3 rows
    ((1, 3, 5, 3), (5, 9), 1),         # one side kept
    ((2, 4, 6, 6), (3, 4), 2),         # downsampling
])
@pytest.mark.parametrize("avg_non_ignore", [True, False])
def test_fused_loss_and_gradient_equal_interpolate_then_cross_entropy(shape, size, rows, avg_non_ignore):
    logits, mask = _inputs(shape, size)
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = upsampled_cross_entropy(ours, mask, avg_non_ignore=avg_non_ignore, rows=rows)
    expected = _reference(ref, mask, avg_non_ignore)
    (2.5 * loss).backward()
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-7, rtol=1e-5)


def test_seg_loss_uses_the_fused_path_with_the_same_result_and_checks_labels():
    logits, mask = _inputs((2, 6, 4, 4), (64, 64))
    for avg in (True, False):
        ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        value = SegLoss("ce", avg_non_ignore=avg)(ours, mask)["loss_ce"]
        value.backward()
        _reference(ref, mask, avg).backward()
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-7, rtol=1e-5)
    mask[0, 0, 0] = 6
    with pytest.raises(ValueError, match="found 6"):
        upsampled_cross_entropy(logits, mask)
    torch.testing.assert_close(bilinear_weights(3, 7).sum(1), torch.ones(7))


def test_sampled_points_read_the_upsampled_logits_and_estimate_the_loss_without_bias():
    logits, mask = _inputs((2, 5, 4, 6), (17, 23), seed=1)
    up = F.interpolate(logits, mask.shape[-2:], mode="bilinear", align_corners=False)
    for avg in (True, False):
        exact = float(_reference(logits, mask, avg))
        gen = torch.Generator().manual_seed(0)
        draws = torch.stack([sampled_cross_entropy(logits, mask, 32, avg_non_ignore=avg, generator=gen)
                             for _ in range(400)])
        assert abs(float(draws.mean()) - exact) < 4 * float(draws.std()) / 20 + 1e-6
    # every pixel drawn many times: the estimate is the exact loss up to the sampling of pixels per image
    gen = torch.Generator().manual_seed(0)
    dense = sampled_cross_entropy(logits, mask, 20000, generator=gen)
    assert abs(float(dense) - float(_reference(logits, mask, True))) < 0.05
    # a batch with one image entirely ignored still works (that image contributes nothing)
    mask[1] = 255
    single = sampled_cross_entropy(logits, mask, 20000, generator=torch.Generator().manual_seed(0))
    assert abs(float(single) - float(_reference(logits, mask, True))) < 0.05
    # at one sampled pixel the logits are F.interpolate's (pixel centre, border clamp)
    one = torch.zeros(1, 17, 23, dtype=torch.long) + 255
    for y, x in [(0, 0), (16, 22), (8, 11)]:
        one[:] = 255
        one[0, y, x] = 2
        expected = F.cross_entropy(up[:1, :, y, x], torch.tensor([2]))
        torch.testing.assert_close(sampled_cross_entropy(logits[:1], one, 3), expected, atol=1e-5, rtol=1e-5)


def test_loss_points_config():
    head = LinearSegHead([16], [16], 4, loss_points=64)
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    mask = torch.randint(0, 4, (2, 48, 48))
    head.loss(logits, {"mask": mask})["loss_ce"].backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss=ce alone"):
        SegLoss(["ce", "dice"], points=64)
    with pytest.raises(ValueError, match="points=-1"):
        SegLoss("ce", points=-1)
