"""tasks.load_predictor / Predictor.predict / predict.py: sliding window vs a per-crop loop, input kinds, TTA, CLI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from tasks import SegmentationTask, load_predictor  # noqa: E402
from tasks.predictor import Predictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _normalized(image: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - MEAN) / STD


def _collate(samples):
    return {"image": torch.stack([s["image"] for s in samples]), "mask": torch.stack([s["mask"] for s in samples])}


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory) -> Path:
    """A vit_test + LinearSegHead checkpoint written by a Lightning Trainer after one step (head randomized)."""
    torch.manual_seed(0)
    task = SegmentationTask(backbone={"name": "vit_test", "weights": None}, head={"_target_": "heads.LinearSegHead"},
                            num_classes=5)
    data = [{"image": torch.randn(3, 64, 64), "mask": torch.randint(0, 5, (64, 64))} for _ in range(2)]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, DataLoader(data, batch_size=2, collate_fn=_collate))
    with torch.no_grad():  # large weights so that windows and classes really differ
        task.head.conv.weight.normal_(0, 0.5)
        task.head.conv.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("seg") / "seg.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def predictor(seg_ckpt) -> Predictor:
    return load_predictor(seg_ckpt)


def _window_starts(length, crop, stride):
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride)) + [length - crop]
    return sorted(set(starts))


def _per_crop_probs(model, image: np.ndarray, crop: int, stride: int) -> torch.Tensor:
    """Reference: pad to the crop, one window at a time, sum logits and counts, average, softmax."""
    x = _normalized(image)
    height, width = x.shape[-2:]
    x = F.pad(x, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    H, W = x.shape[-2:]
    total, count = None, torch.zeros(1, H, W)
    with torch.no_grad():
        for y in _window_starts(H, crop, stride):
            for x0 in _window_starts(W, crop, stride):
                out = model(x[None, :, y:y + crop, x0:x0 + crop])[0]
                total = torch.zeros(out.shape[0], H, W) if total is None else total
                total[:, y:y + crop, x0:x0 + crop] += out
                count[:, y:y + crop, x0:x0 + crop] += 1
    return (total / count)[:, :height, :width].softmax(0)


def test_load_checkpoint_kind_and_weights_only(seg_ckpt, predictor):
    checkpoint = torch.load(seg_ckpt, map_location="cpu", weights_only=True)  # plain containers + tensors
    assert checkpoint["task_class"] == "tasks.segmentation.SegmentationTask"
    assert predictor.kind == "segmentation" and predictor.num_classes == 5
    state = {k[5:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("head.")}
    for key, value in predictor.model.head.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)


def test_slide_equals_one_crop_at_a_time_on_odd_sizes(predictor):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((250, 390), (512, 683), (100, 140))]
    results = predictor.predict(images, mode="slide", crop=512, stride=341, batch_size=3, tta=False)
    for image, result in zip(images, results):
        expected = _per_crop_probs(predictor.model, image, 512, 341)
        assert result["probs"].shape == (5, *image.shape[:2]) and result["labels"].shape == image.shape[:2]
        torch.testing.assert_close(result["probs"], expected, atol=1e-5, rtol=0)
        assert torch.equal(result["labels"], result["probs"].argmax(0))
    # many windows in both directions, crops of two images mixed in batches, sums accumulated on the model device
    small = predictor.predict(images[::2], mode="slide", crop=128, stride=85, batch_size=4, out_device=None)
    for image, result in zip(images[::2], small):
        torch.testing.assert_close(result["probs"], _per_crop_probs(predictor.model, image, 128, 85), atol=1e-5, rtol=0)


def test_whole_mode_and_every_input_kind(predictor, tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    expected = predictor.model(_normalized(rgb)[None]).softmax(1)[0]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, rng.integers(0, 256, size=(40, 56, 1), dtype=np.uint8)], axis=2)
    inputs = [str(tmp_path / "rgb.png"), tmp_path / "rgb.png", Image.fromarray(rgb), rgb,
              torch.from_numpy(rgb).permute(2, 0, 1), Image.fromarray(rgba, mode="RGBA"), rgba]
    for result in predictor.predict(inputs, mode="whole", tta=False):
        torch.testing.assert_close(result["probs"], expected, atol=1e-5, rtol=0)
    single = predictor.predict(rgb, tta=False)  # one image in, one dict out
    assert isinstance(single, dict) and single["labels"].shape == (40, 56)
    # grayscale (array and 8-bit file) = the grey value on 3 channels; 16-bit PNG scaled like dense_data.io
    grey = rng.integers(0, 256, size=(40, 56), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    deep = (grey.astype(np.uint16) * 257 + rng.integers(0, 200, size=grey.shape)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    grey_expected = predictor.model(_normalized(np.repeat(grey[..., None], 3, 2))[None]).softmax(1)[0]
    deep_rgb = np.repeat((deep.astype(np.float64) / 65535 * 255).astype(np.uint8)[..., None], 3, 2)
    deep_expected = predictor.model(_normalized(deep_rgb)[None]).softmax(1)[0]
    got = predictor.predict([grey, tmp_path / "grey.png", tmp_path / "deep.png", deep], tta=False)
    for result, reference in zip(got, (grey_expected, grey_expected, deep_expected, deep_expected)):
        torch.testing.assert_close(result["probs"], reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mode"):
        predictor.predict(rgb, mode="tiles")


class PixelModel(nn.Module):
    """A per-pixel model (1x1 conv): exactly flip-equivariant; ``ramp`` adds a left-to-right bias that breaks it."""

    def __init__(self, out_channels: int, ramp: float = 0.0, positive: bool = False):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, out_channels, 1)
        nn.init.normal_(self.conv.weight, std=2.0)
        self.ramp, self.positive = ramp, positive

    def forward(self, x):
        out = self.conv(x)
        if self.ramp:
            position = torch.linspace(0, 1, x.shape[-1]).view(1, 1, 1, -1)
            out = out + self.ramp * position * torch.arange(out.shape[1]).view(1, -1, 1, 1)
        return F.softplus(out) if self.positive else out


def _up(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def test_tta_flip_on_an_equivariant_model_changes_nothing():
    predictor = Predictor(PixelModel(4), "segmentation", num_classes=4)
    image = np.random.default_rng(2).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    for mode in ("whole", "slide"):
        plain = predictor.predict(image, mode=mode, crop=32, stride=21, tta=False)
        flipped = predictor.predict(image, mode=mode, crop=32, stride=21, tta={"flip": True})
        torch.testing.assert_close(flipped["probs"], plain["probs"], atol=1e-6, rtol=0)


def test_tta_averages_probabilities_over_flips_and_scales():
    model = PixelModel(4, ramp=3.0)
    predictor = Predictor(model, "segmentation", num_classes=4)
    image = np.random.default_rng(4).integers(0, 256, size=(30, 45, 3), dtype=np.uint8)
    x = _normalized(image)[None]
    scales = (0.5, 1.0, 1.5)
    probs, logits = [], []
    with torch.no_grad():
        for s in scales:
            xs = _up(x, (int(30 * s + 0.5), int(45 * s + 0.5)))
            for flip in (False, True):
                out = model(xs.flip(-1)).flip(-1) if flip else model(xs)
                logits.append(_up(out, (30, 45))[0])
                probs.append(logits[-1].softmax(0))
    got = predictor.predict(image, mode="whole", tta={"flip": True, "scales": list(scales)})
    assert got["probs"].shape == (4, 30, 45)
    torch.testing.assert_close(got["probs"], torch.stack(probs).mean(0), atol=1e-5, rtol=0)
    assert (got["probs"] - torch.stack(logits).mean(0).softmax(0)).abs().max() > 1e-3  # not logit averaging
    flip_only = predictor.predict(image, mode="whole", tta=True)
    torch.testing.assert_close(flip_only["probs"], (probs[2] + probs[3]) / 2, atol=1e-5, rtol=0)
    plain = predictor.predict(image, mode="whole", tta=False)
    assert (plain["probs"] - flip_only["probs"]).abs().max() > 1e-3  # the model is not flip-equivariant


def test_depth_tta_averages_depth():
    model = PixelModel(1, ramp=0.0, positive=True)
    model.ramp = 0.0
    predictor = Predictor(model, "depth")
    image = np.random.default_rng(5).integers(0, 256, size=(33, 47, 3), dtype=np.uint8)
    x = _normalized(image)[None]
    with torch.no_grad():
        expected = torch.stack([_up(model(_up(x, (int(33 * s + 0.5), int(47 * s + 0.5)))), (33, 47))[0, 0]
                                for s in (0.75, 1.25)]).mean(0)
    got = predictor.predict(image, mode="slide", crop=32, stride=21, tta={"flip": True, "scales": [0.75, 1.25]})
    assert set(got) == {"depth"} and got["depth"].shape == (33, 47)
    torch.testing.assert_close(got["depth"], expected, atol=1e-5, rtol=0)  # per-pixel model: flips and windows agree


def _save_like_lightning(task, path):
    """What Lightning writes (state_dict + hyper_parameters, after the task's on_save_checkpoint hook)."""
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


def test_depth_task_checkpoint(tmp_path):
    depth = pytest.importorskip("tasks.depth")
    torch.manual_seed(0)
    task = depth.DepthTask(backbone={"name": "vit_test", "weights": None},
                           head={"_target_": "heads.dpt.DPTHead", "features": 16, "head_hidden": 8}).eval()
    _save_like_lightning(task, tmp_path / "depth.ckpt")
    predictor = load_predictor(tmp_path / "depth.ckpt")
    assert predictor.kind == "depth"
    image = np.random.default_rng(6).integers(0, 256, size=(40, 70, 3), dtype=np.uint8)
    got = predictor.predict(image, mode="whole", tta=False)
    with torch.no_grad():
        expected = task.dense(_normalized(image)[None])[0, 0]
    assert got["depth"].shape == (40, 70)
    torch.testing.assert_close(got["depth"], expected, atol=1e-5, rtol=1e-5)


def test_detection_task_checkpoint(tmp_path):
    detection = pytest.importorskip("tasks.detection")
    torch.manual_seed(0)
    head = {"_target_": "heads.detr.DETRHead", "hidden_dim": 32, "num_queries": 10, "enc_layers": 1, "dec_layers": 1,
            "num_heads": 2, "num_points": 2, "num_levels": 2, "ffn_dim": 32, "topk": 5}
    task = detection.DetectionTask(backbone={"name": "vit_test", "weights": None}, head=head, num_classes=3).eval()
    _save_like_lightning(task, tmp_path / "det.ckpt")
    predictor = load_predictor(tmp_path / "det.ckpt")
    assert predictor.kind == "detection"
    images = [np.random.default_rng(7).integers(0, 256, size=(40, 70, 3), dtype=np.uint8)] * 2
    got = predictor.predict(images, mode="whole", tta=False)
    x = task.pad_to_stride(_normalized(images[0])[None])
    with torch.no_grad():
        expected = task.head.predict(task(x), tuple(x.shape[-2:]))[0]
    for result in got:
        assert result["boxes"].shape == (5, 4)
        torch.testing.assert_close(result["boxes"], expected["boxes"].clamp(min=0).minimum(
            torch.tensor([70.0, 40.0, 70.0, 40.0])), atol=1e-4, rtol=0)
        torch.testing.assert_close(result["scores"], expected["scores"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="detection"):
        predictor.predict(images[0], tta=True)


def test_predict_cli_on_real_photos_with_a_corrupt_file(seg_ckpt, tmp_path):
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg", quality=90)
    Image.fromarray(data.chelsea()).save(folder / "chelsea.jpeg")
    Image.fromarray(data.camera()).save(folder / "camera_grey.png")
    rgba = np.concatenate([data.coffee(), np.full(data.coffee().shape[:2] + (1,), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(folder / "coffee_rgba.png")
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(folder / "camera_16bit.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), f"ckpt={seg_ckpt}", f"input={folder}",
                           f"output={out}", "mode=whole", "batch_size=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert "broken.png" in proc.stdout and "1 failed" in proc.stdout, log
    assert "6 of 7 images predicted" in proc.stdout, log
    for name in ("astronaut", "coffee", "chelsea", "camera_grey", "coffee_rgba", "camera_16bit"):
        labels = Image.open(out / f"{name}_labels.png")
        source = Image.open(next(folder.glob(f"{name}.*")))
        assert labels.size == source.size and labels.mode == "L"
        assert np.asarray(labels).max() < 5
        overlay = Image.open(out / f"{name}_overlay.png")
        assert overlay.size == source.size and overlay.mode == "RGB"
    assert not list(out.glob("broken*"))
