import torch

from tasks.inference import slide_inference, whole_inference, window_starts


def test_window_grid_known_answers():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]             # mmseg: ceil(171/341)+1 = 2, last shifted back
    assert window_starts(2048, 512, 341) == [0, 341, 682, 1023, 1364, 1536]
    assert window_starts(300, 512, 341) == [0]


def _per_crop_loop(fn, image, crop, stride):
    """The reference: one crop at a time, as in mmseg / Meta's code."""
    _, height, width = image.shape
    ph, pw = max(crop - height, 0), max(crop - width, 0)
    padded = torch.nn.functional.pad(image, (0, pw, 0, ph))
    H, W = padded.shape[-2:]
    total = count = None
    for y in window_starts(H, crop, stride):
        for x in window_starts(W, crop, stride):
            out = fn(padded[None, :, y:y + crop, x:x + crop])[0]
            if total is None:
                total = torch.zeros(out.shape[0], H, W)
                count = torch.zeros(1, H, W)
            total[:, y:y + crop, x:x + crop] += out
            count[:, y:y + crop, x:x + crop] += 1
    return (total / count)[:, :height, :width]


def test_slide_matches_one_crop_at_a_time_on_odd_sizes():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 5, padding=2)

    def fn(x):
        return conv(x) + x.mean((1, 2, 3), keepdim=True)  # depends on the whole crop, like a ViT

    images = [torch.randn(3, 50, 78), torch.randn(3, 102, 136), torch.randn(3, 20, 30)]
    with torch.no_grad():
        got = slide_inference(fn, images, crop=32, stride=21, batch_size=5)
        for image, out in zip(images, got):
            torch.testing.assert_close(out, _per_crop_loop(fn, image, 32, 21), atol=1e-5, rtol=0)
            assert out.shape[-2:] == image.shape[-2:]
        cpu = slide_inference(fn, images, crop=32, stride=21, batch_size=3, out_device="cpu")
        torch.testing.assert_close(cpu[1], got[1])


def test_whole_inference_batches_equal_sizes():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return x[:, :1] * 2

    images = [torch.randn(3, 8, 8), torch.randn(3, 8, 12), torch.randn(3, 8, 8)]
    outs = whole_inference(fn, images, batch_size=4)
    assert sorted(calls) == [1, 2]
    for image, out in zip(images, outs):
        torch.testing.assert_close(out, image[:1] * 2)
