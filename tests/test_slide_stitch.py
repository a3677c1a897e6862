"""Sliding-window stitching: the running mean (WindowMean) against a zero-filled sum / count loop, stitching on
a head's own coarser grid (``output_stride``) against full-resolution stitching, and coarse window outputs
upsampled while stitched (``upsample``) against stitching the upsampled windows."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backbones import build_backbone  # noqa: E402
from heads import LinearSegHead  # noqa: E402
from heads.mask2former import Mask2FormerHead  # noqa: E402
from tasks import SegmentationTask  # noqa: E402
from tasks.inference import SeparableBilinear, slide_inference, window_starts  # noqa: E402
from tasks.tta import TTA, tta_inference  # noqa: E402
from tasks.predictor import DenseModel, Predictor  # noqa: E402


def _sum_and_count(fn, image, crop, stride):
    """The old stitching: zero-filled sums and counts at full resolution, one division at the end."""
    (ch, cw), (sh, sw) = crop, stride
    height, width = image.shape[-2:]
    padded = F.pad(image, (0, max(cw - width, 0), 0, max(ch - height, 0)))
    H, W = padded.shape[-2:]
    total, count = None, torch.zeros(1, H, W, dtype=torch.float64)
    for y in window_starts(H, ch, sh):
        for x in window_starts(W, cw, sw):
            out = fn(padded[None, :, y:y + ch, x:x + cw])[0].double()
            total = torch.zeros(out.shape[0], H, W, dtype=torch.float64) if total is None else total
            total[:, y:y + ch, x:x + cw] += out
            count[:, y:y + ch, x:x + cw] += 1
    return (total / count)[:, :height, :width]


def _context_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def fn(x):  # depends on the whole crop, like a ViT
        return conv(x) + x.mean((1, 2, 3), keepdim=True)
    return fn


@pytest.mark.parametrize("crop,stride", [((32, 32), (21, 21)), ((24, 40), (24, 13)), ((32, 32), (32, 32)),
                                         ((16, 16), (5, 11))])
def test_running_mean_equals_sum_and_count(crop, stride):
    fn = _context_conv()
    images = [torch.randn(3, 50, 78), torch.randn(3, 102, 136), torch.randn(3, 20, 30), torch.randn(3, 32, 40)]
    with torch.no_grad():
        got = slide_inference(fn, images, crop, stride, batch_size=3)
        for image, out in zip(images, got):
            assert out.shape == (6, *image.shape[-2:])
            torch.testing.assert_close(out.double(), _sum_and_count(fn, image, crop, stride), atol=1e-5, rtol=1e-5)


def test_every_pixel_written_once_per_window():
    """Constant outputs average to the constant: no cell left unwritten (the sums start uninitialised)."""
    ones = slide_inference(lambda x: torch.ones(x.shape[0], 2, *x.shape[-2:]), [torch.randn(3, 97, 201)],
                           crop=32, stride=7, batch_size=4)[0]
    torch.testing.assert_close(ones, torch.ones_like(ones), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="exceeds the crop"):
        slide_inference(lambda x: x, [torch.randn(3, 64, 64)], crop=16, stride=20)


def _local_native(s: int):
    """A translation-equivariant, local dense function at stride ``s`` (average pool + 1x1 conv) and its
    full-resolution version (bilinear upsampling of the same output, as heads' ``predict`` does)."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 1)

    def native(x):
        return conv(F.avg_pool2d(x, s))

    def full(x):
        return F.interpolate(native(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return native, full


def test_native_stitching_equals_whole_image_when_windows_sit_on_the_grid():
    """Windows on multiples of ``s``: every window gives the same value for a cell, so the coarse mean is the
    whole-image output and one upsampling reproduces the whole-image prediction exactly. Full-resolution stitching
    differs only within ``s / 2`` pixels of inner window edges (each window's upsampling clamps at its border)."""
    s, crop, stride = 8, 64, 40
    native, full = _local_native(s)
    image = torch.randn(3, 128, 184)
    with torch.no_grad():
        whole = full(image[None])[0]
        coarse = slide_inference(native, [image], crop, stride, batch_size=4, output_stride=s)[0]
        fine = slide_inference(full, [image], crop, stride, batch_size=4)[0]
    torch.testing.assert_close(coarse, whole, atol=1e-5, rtol=0)
    near_edge = torch.zeros(image.shape[-2:], dtype=torch.bool)
    for axis, length in ((0, 128), (1, 184)):
        for start in window_starts(length, crop, stride):
            for edge in (start, start + crop):
                if 0 < edge < length:
                    index = [slice(None), slice(None)]
                    index[axis] = slice(edge - s // 2, edge + s // 2)
                    near_edge[tuple(index)] = True
    assert (fine - whole).abs()[:, ~near_edge].max() < 1e-5
    assert (fine - whole).abs()[:, near_edge].max() > 1e-3  # the difference is real, and only there


def test_native_stitching_off_the_grid_is_bounded():
    """Starts off the grid are rounded to it: the result stays a convex mix of window outputs, near the full one."""
    s = 4
    native, full = _local_native(s)
    images = [torch.randn(3, 70, 90), torch.randn(3, 30, 45)]
    with torch.no_grad():
        coarse = slide_inference(native, images, 32, 21, batch_size=3, output_stride=s)
        fine = slide_inference(full, images, 32, 21, batch_size=3)
    for image, c, f in zip(images, coarse, fine):
        assert c.shape == f.shape == (5, *image.shape[-2:])
        spread = (f.amax((1, 2)) - f.amin((1, 2)))[:, None, None]
        assert ((c - f).abs() <= spread).all()
    with pytest.raises(ValueError, match="output grid"):
        slide_inference(native, images, 32, 21, output_stride=2)


@pytest.fixture(scope="module")
def vit_test():
    torch.manual_seed(0)
    return build_backbone("vit_test", weights=None)


def test_predictor_native_stitch_linear_and_m2f(vit_test):
    linear = LinearSegHead(vit_test.channels, vit_test.strides, 5)
    m2f = Mask2FormerHead(vit_test.channels, vit_test.strides, 5, hidden_dim=32, num_queries=8, dec_layers=2,
                          enc_layers=1, num_heads=2)
    small, large = torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8), torch.randint(0, 256, (96, 150, 3),
                                                                                        dtype=torch.uint8)
    for head, stride in ((linear, 16), (m2f, 4)):
        with torch.no_grad():
            head.eval()
        predictor = Predictor(DenseModel(vit_test, head, "segmentation"), "segmentation", num_classes=5)
        assert predictor.model.output_stride == stride
        coarse = predictor.predict([small, large], mode="slide", crop=64, stride=48, stitch="native")
        fine = predictor.predict([small, large], mode="slide", crop=64, stride=48, stitch="full")
        for c, f, image in zip(coarse, fine, (small, large)):
            assert c["probs"].shape == f["probs"].shape == (5, *image.shape[:2])
            assert (c["probs"] - f["probs"]).abs().max() < 0.5
        # one window: the linear head's coarse logits upsampled once are exactly its prediction
        if head is linear:
            torch.testing.assert_close(coarse[0]["probs"], fine[0]["probs"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="stitch must be"):
        predictor.predict(small, mode="slide", stitch="half")


def test_predictor_native_refused_without_native_head(vit_test):
    class Upsampled(torch.nn.Module):  # a head with only a full-resolution prediction (like DPT)
        def forward(self, features, image_size):
            return features.maps[-1][:, :2]

        def predict(self, outputs, image_size):
            return F.interpolate(outputs, image_size, mode="bilinear", align_corners=False)

    predictor = Predictor(DenseModel(vit_test, Upsampled(), "depth"), "depth")
    with pytest.raises(ValueError, match="native-resolution"):
        predictor.predict(torch.zeros(32, 32, 3, dtype=torch.uint8), mode="slide", crop=32, stride=16,
                          stitch="native")


def test_segmentation_task_native_validation():
    task = SegmentationTask(backbone={"name": "vit_test", "weights": None}, head={"_target_": "heads.LinearSegHead"},
                            num_classes=4, eval_mode="slide", eval_crop=64, eval_stride=48, eval_stitch="native")
    task.eval()
    images = [torch.randn(3, 64, 64), torch.randn(3, 80, 120)]
    with torch.no_grad():
        coarse = task.predict_scores(images)
        task.eval_stitch = "full"
        fine = task.predict_scores(images)
    torch.testing.assert_close(coarse[0], fine[0], atol=1e-5, rtol=0)  # one window: exactly equal
    assert coarse[1].shape == fine[1].shape == (4, 80, 120)
    with torch.no_grad():  # full stitching upsamples the windows' native logits as it stitches: same scores
        upsampled = [task.dense(image[None])[0] for image in images[:1]]
        reference = tta_inference(task.dense, images, task.eval_tta, "slide", 64, 48)
    torch.testing.assert_close(fine[0], upsampled[0], atol=1e-5, rtol=0)
    for got, want in zip(fine, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="eval_stitch"):
        SegmentationTask(backbone={"name": "vit_test", "weights": None}, head={"_target_": "heads.LinearSegHead"},
                         num_classes=4, eval_stitch="coarse")


def test_stride_longer_than_the_crop_is_refused_only_where_it_leaves_gaps():
    fn = lambda x: x[:, :1]  # noqa: E731
    two = torch.rand(3, 16, 30)  # windows at 0 and 14 (the last shifted back): no gap
    assert slide_inference(fn, [two], crop=16, stride=40)[0].shape == (1, 16, 30)
    with pytest.raises(ValueError, match=r"gaps in images of size \(16, 100\)"):
        slide_inference(fn, [torch.rand(3, 16, 100)], crop=16, stride=40)


def _padded_native(s: int):
    """A local dense function at stride ``s`` that pads its input bottom/right to a multiple of ``s`` (as the
    backbone does) and gives the whole padded grid, and its full-resolution version: that grid upsampled
    (``F.interpolate``) to the padded size and cut to the input, as ``DenseModel`` gives a linear head's ``predict``."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 7, 1)

    def native(x):
        return conv(F.avg_pool2d(F.pad(x, (0, -x.shape[-1] % s, 0, -x.shape[-2] % s)), s)) + x.mean()

    def full(x):
        grid = native(x)
        size = (grid.shape[-2] * s, grid.shape[-1] * s)
        return F.interpolate(grid, size, mode="bilinear", align_corners=False)[..., :x.shape[-2], :x.shape[-1]]
    return native, full


@pytest.mark.parametrize("s,crop,stride", [(4, (32, 32), (21, 21)), (8, (30, 44), (17, 40)), (16, (64, 64), (48, 48))])
def test_windows_upsampled_while_stitched_equal_upsampled_windows(s, crop, stride):
    """``upsample=True``: coarse window outputs upsampled as they are stitched give full-resolution stitching of
    the upsampled windows (padding cut, images smaller than the crop padded) to float rounding."""
    native, full = _padded_native(s)
    images = [torch.randn(3, 70, 131), torch.randn(3, 20, 30), torch.randn(3, 64, 64)]
    with torch.no_grad():
        fused = slide_inference(native, images, crop, stride, batch_size=3, output_stride=s, upsample=True)
        reference = slide_inference(full, images, crop, stride, batch_size=3)
    for image, got, want in zip(images, fused, reference):
        assert got.shape == want.shape == (7, *image.shape[-2:])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not cover"):
        slide_inference(lambda x: native(x)[..., :-1], images[:1], crop, stride, output_stride=s, upsample=True)


@pytest.mark.parametrize("grid,s,size,block", [((5, 9), 4, (20, 36), 256), ((7, 3), 16, (100, 40), 32),
                                               ((4, 6), 8, (32, 48), 5), ((1, 2), 3, (3, 5), 2)])
def test_separable_bilinear_equals_interpolate(grid, s, size, block):
    x = torch.randn(6, *grid)
    want = F.interpolate(x[None], (grid[0] * s, grid[1] * s), mode="bilinear", align_corners=False)[0]
    got = SeparableBilinear(grid, s, size, x)(x, block)
    torch.testing.assert_close(got, want[:, :size[0], :size[1]], atol=1e-5, rtol=1e-5)


def test_predictor_full_stitch_upsamples_native_logits(vit_test):
    """A linear head's ``stitch=full`` takes its 1/16 logits and upsamples them while stitching: the same
    probabilities (1e-6) and labels as stitching the model's full-resolution outputs, TTA and both small-image
    rules included; a Mask2Former head (sigmoid after upsampling) keeps the full-resolution outputs."""
    head = LinearSegHead(vit_test.channels, vit_test.strides, 5).eval()
    model = DenseModel(vit_test, head, "segmentation")
    assert model.upsamples_native
    m2f = Mask2FormerHead(vit_test.channels, vit_test.strides, 5, hidden_dim=32, num_queries=8, dec_layers=2,
                          enc_layers=1, num_heads=2)
    assert not DenseModel(vit_test, m2f, "segmentation").upsamples_native
    predictor = Predictor(model, "segmentation", num_classes=5)
    images = [torch.randn(3, 50, 60), torch.randn(3, 90, 150)]
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs.get("cut", True)),
                                    with_kwargs=True)
    for tta, small_image in ((False, "pad"), ({"flip": True, "scales": [1.0, 0.75]}, "shrink")):
        calls.clear()
        got = predictor.predict([image.permute(1, 2, 0) for image in images], mode="slide", crop=48, stride=32,
                                tta=tta, small_image=small_image)
        assert calls and not any(calls)  # every forward gave the uncut native grid
        with torch.no_grad():
            want = tta_inference(predictor._run, [predictor.preprocess(image.permute(1, 2, 0)) for image in images],
                                 TTA.make(tta), "slide", 48, 32, small_image=small_image,
                                 value=predictor.to_probs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g["probs"], w, atol=1e-6, rtol=0)
            top2 = w.topk(2, dim=0).values
            clear = top2[0] - top2[1] > 1e-5
            assert torch.equal(g["labels"][clear], w.argmax(0)[clear])


def _clear_argmax(scores: torch.Tensor, margin: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax over channels and where it is clear (top two more than ``margin`` apart)."""
    top2 = scores.topk(2, dim=0).values
    return scores.argmax(0), top2[0] - top2[1] > margin


def test_labels_in_row_bands_equal_argmax_of_the_mean():
    """``labels=True`` with ``upsample``: the mean built 64 rows at a time gives the labels of the whole mean."""
    native, _ = _padded_native(4)
    images = [torch.randn(3, 150, 70), torch.randn(3, 20, 30)]
    with torch.no_grad():
        labels = slide_inference(native, images, 32, 21, batch_size=3, output_stride=4, upsample=True, labels=True)
        means = slide_inference(native, images, 32, 21, batch_size=3, output_stride=4, upsample=True)
        plain = slide_inference(native, images, 32, 21, batch_size=3, output_stride=4, labels=True)
    for image, label, mean, coarse in zip(images, labels, means, plain):
        want, clear = _clear_argmax(mean)
        assert label.shape == coarse.shape == image.shape[-2:] and label.dtype == torch.long
        assert clear.float().mean() > 0.99 and torch.equal(label[clear], want[clear])


def test_predictor_labels_only_slide(vit_test):
    """``return_probs=False`` (predict.py's label maps) takes the banded argmax: the labels of the full path."""
    head = LinearSegHead(vit_test.channels, vit_test.strides, 5).eval()
    predictor = Predictor(DenseModel(vit_test, head, "segmentation"), "segmentation", num_classes=5)
    images = [torch.randint(0, 256, (130, 90, 3), dtype=torch.uint8), torch.randint(0, 256, (40, 50, 3),
                                                                                     dtype=torch.uint8)]
    for small_image in ("pad", "shrink"):
        full = predictor.predict(images, mode="slide", crop=64, stride=40, small_image=small_image)
        only = predictor.predict(images, mode="slide", crop=64, stride=40, small_image=small_image,
                                 return_probs=False)
        for f, o in zip(full, only):
            want, clear = _clear_argmax(f["probs"], 1e-6)
            assert set(o) == {"labels"} and o["labels"].shape == f["labels"].shape
            assert torch.equal(o["labels"][clear], want[clear])
