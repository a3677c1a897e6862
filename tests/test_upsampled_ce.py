"""heads/ops/upsampled_ce.py: the fused upsample + cross-entropy equals F.interpolate + F.cross_entropy (value and
gradient) every way (rows by recurrence in the compiled kernel and in PyTorch, chunks); the point-sampled estimate is
exact at its points and unbiased."""

import pytest
import torch
import torch.nn.functional as F

from heads import LinearSegHead
from heads.ops import upsampled_ce, upsampled_ce_native
from heads.ops.upsampled_ce import bilinear_weights, row_runs, sampled_cross_entropy, upsampled_cross_entropy
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


CASES = [
    ((2, 7, 8, 8), (128, 128), None),  # 16x, rows by recurrence (runs of 16 rows: a fresh exp2 every 8)
    ((2, 7, 8, 8), (128, 128), 40),    # 16x, chunks of 40 rows
    ((1, 5, 4, 4), (128, 96), None),   # 32x / 24x: runs of 32 rows
    ((2, 5, 4, 6), (17, 23), None),    # odd factors; the compiled kernel's last tile of a row is 7 columns wide
    ((2, 5, 4, 6), (17, 23), 3),       # odd factors, chunks of 3 rows
    ((1, 3, 5, 3), (5, 9), None),      # one side kept
    ((1, 3, 5, 3), (5, 9), 1),
    ((2, 4, 6, 6), (3, 4), None),      # downsampling
    ((2, 4, 6, 6), (3, 4), 2),
]


@pytest.fixture(params=["compiled", "torch"])
def recurrence(request, monkeypatch):
    """Rows by recurrence in the compiled kernel, or in PyTorch (as where no compiler is found)."""
    if request.param == "torch":
        monkeypatch.setattr(upsampled_ce_native, "rows_kernel", lambda *flags: None)
    else:
        assert upsampled_ce_native.rows_kernel() is not None, "the kernel must build where the tests run"
    return request.param


def _check_against_reference(shape, size, avg_non_ignore, rows=None, spread=1.0):
    logits, mask = _inputs(shape, size)
    ours, ref = (logits * spread).requires_grad_(), (logits * spread).requires_grad_()
    loss = upsampled_cross_entropy(ours, mask, avg_non_ignore=avg_non_ignore, rows=rows)
    expected = _reference(ref, mask, avg_non_ignore)
    (2.5 * loss).backward()
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-7, rtol=1e-5)
    with torch.no_grad():  # without a gradient to form, the same value
        torch.testing.assert_close(upsampled_cross_entropy(ours, mask, avg_non_ignore=avg_non_ignore, rows=rows),
                                   loss.detach())


@pytest.mark.parametrize("shape,size,rows", CASES)
@pytest.mark.parametrize("avg_non_ignore", [True, False])
def test_fused_loss_and_gradient_equal_interpolate_then_cross_entropy(shape, size, rows, avg_non_ignore):
    _check_against_reference(shape, size, avg_non_ignore, rows)


@pytest.mark.parametrize("shape,size", [(shape, size) for shape, size, rows in CASES if rows is None])
def test_recurrence_equals_interpolate_then_cross_entropy_compiled_and_in_torch(shape, size, recurrence):
    _check_against_reference(shape, size, True)


@pytest.mark.parametrize("flags", [(), ("-mavx2", "-mfma")], ids=["baseline", "avx2"])
def test_each_version_of_the_compiled_kernel_gives_the_same_numbers(flags, monkeypatch):
    """A default build runs the version the CPU picks; build the baseline and the AVX2 versions alone, and check each
    (the case has a partial tile and runs of 16 rows)."""
    if flags and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    kernel = upsampled_ce_native.rows_kernel(("-DNATIVE_ONE_VERSION", *flags))
    assert kernel is not None
    monkeypatch.setattr(upsampled_ce_native, "rows_kernel", lambda *a: kernel)
    _check_against_reference((2, 7, 8, 5), (128, 72), True)


def test_compiled_kernel_splits_the_tiles_between_threads_with_the_same_numbers():
    logits, mask = _inputs((3, 9, 8, 8), (128, 120))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 5):
            torch.set_num_threads(count)
            ours = logits.clone().requires_grad_()
            loss = upsampled_cross_entropy(ours, mask)
            loss.backward()
            results.append((loss.detach(), ours.grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(grad, results[0][1], atol=1e-9, rtol=1e-5)


def test_row_runs_rebuild_the_bilinear_weights():
    # hand-worked, 2 -> 8 rows: sources -0.375 -0.125 (clamped to 0), 0.125 .. 0.875, then 1.125 1.375 (both on row 1)
    assert row_runs(2, 8) == [(0, 2, 0, 1, 0.0, 0.0), (2, 6, 0, 1, 0.125, 0.25), (6, 8, 1, 1, 0.125, 0.25)]
    for size_in, size_out in [(32, 512), (4, 17), (6, 3), (5, 5), (7, 100)]:
        rebuilt = torch.zeros(size_out, size_in, dtype=torch.float64)
        for start, stop, low, high, frac, step in row_runs(size_in, size_out):
            f = frac + step * torch.arange(stop - start, dtype=torch.float64)
            rebuilt[start:stop, low] += 1 - f
            rebuilt[start:stop, high] += f
        torch.testing.assert_close(rebuilt.float(), bilinear_weights(size_in, size_out))


def test_the_compiled_rows_are_taken_on_cpu_then_torch_rows_and_chunks_when_classes_span_too_many_octaves(
        monkeypatch):
    taken = []
    for way in ("_by_compiled_rows", "_by_recurrence", "_by_chunks"):
        original = getattr(upsampled_ce, way)
        monkeypatch.setattr(upsampled_ce, way, lambda *a, _f=original, _w=way: taken.append(_w) or _f(*a))
    kernel = upsampled_ce_native.rows_kernel
    # 200 * randn: logits far below FLOOR octaves
    for spread, builds, way in [(3, True, "_by_compiled_rows"), (3, False, "_by_recurrence"),
                                (200, True, "_by_chunks")]:
        monkeypatch.setattr(upsampled_ce_native, "rows_kernel", kernel if builds else lambda *flags: None)
        taken.clear()
        _check_against_reference((2, 6, 4, 4), (64, 64), True, spread=spread)
        assert taken == [way, way]  # with and without the gradient


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


def test_sampled_points_of_half_precision_logits_sit_at_their_pixels():
    """Pixel coordinates stay exact with bf16 logits (bf16 holds integers exactly only up to 256)."""
    logits = (torch.randn(1, 3, 2, 640, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    mask = torch.full((1, 2, 640), 255)
    mask[0, 1, 511] = 1  # same size as the logits: pixel 511 reads exactly logits[..., 511]
    expected = F.cross_entropy(logits.float()[:, :, 1, 511], torch.tensor([1]))
    value = sampled_cross_entropy(logits, mask, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(value.float(), expected, atol=1e-5, rtol=1e-5)
