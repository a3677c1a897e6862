"""Parity with Meta's dinov3 depth code on random weights (fixtures from tools/meta_fixtures/depth.py).

Meta's DPT depther (ViT-S layers, 64x64, 48x80 and 40x72 centre-padded), its CHMv2 head layout, SiLog with warm-up,
the depth metrics (Eigen crop, gt >= max dropped, least-squares alignment), the one-cycle schedule, and the converter
of Meta's depther files through load_predictor / export / head.weights. The head files are rebuilt from their seeded
manifests and saved as Meta saves them (a flat ``DPTHead`` state dict in a ``.pth``) before being read.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backbones.features import Features
from backbones.registry import get_spec
from heads.depth_losses import SiLogLoss
from heads.dpt.meta_checkpoint import CHMV2, DEPTHER
from heads.linear_depth import LinearDepthHead
from reference_arrays import load_arrays  # noqa: E402
from seeded_weights import read_manifest, state_dict_from, write_meta_file
from tasks.loading import build_head, load_predictor
from tasks.meta_heads import detect_format, load_head_weights
from tasks.metrics.depth import image_depth_metrics
from tasks.one_cycle import WarmupOneCycleLR
from tasks.padding import center_pad
from tasks.predictor import DenseModel, ExportError

FIXTURES = Path(__file__).parent / "fixtures" / "meta" / "depth"
ATOL = 1e-4


@pytest.fixture(scope="module")
def dpt_file(tmp_path_factory):
    return write_meta_file(FIXTURES / "dpt_vits16.manifest.json", tmp_path_factory.mktemp("meta_depth"))


@pytest.fixture(scope="module")
def chmv2_file(tmp_path_factory):
    return write_meta_file(FIXTURES / "chmv2.manifest.json", tmp_path_factory.mktemp("meta_depth"))


def meta_head(path, fmt, backbone):
    state = torch.load(path, map_location="cpu", weights_only=True)
    meta = fmt.convert(state, get_spec(backbone), str(path))
    channels = [state["reassemble_blocks.projects.0.conv.weight"].shape[1]] * 4
    head = build_head(meta.head, channels, [16] * 4, None)
    head.load_state_dict(meta.state, strict=True)
    return head.eval(), meta


def features(t, prefix, padded):
    maps = [t[f"{prefix}map{i}"] for i in range(4)]
    cls = [t[f"{prefix}cls{i}"] for i in range(4)]
    return Features(maps=maps, cls=cls, strides=[16] * 4, channels=[m.shape[1] for m in maps], patch_size=16,
                    padded_size=padded)


def assert_depth_close(ours, meta):
    """Depth in metres: relative 1e-5."""
    torch.testing.assert_close(ours, meta, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def dpt(dpt_file):
    return meta_head(dpt_file, DEPTHER, "vits16")


@pytest.fixture(scope="module")
def dpt_tensors():
    return load_arrays(FIXTURES / "dpt_vits16.npz")


# ------------------------------------------------------------------------------------------------ the depther
@pytest.mark.parametrize("size", ["64x64", "48x80"])
def test_dpt_forward_equals_meta(dpt, dpt_tensors, size):
    """Meta's head output (64x96 for 48x80: its x2 fusion rounds the stride-32 grid up) resized to the input, as
    Meta's evaluation resizes it."""
    head, _ = dpt
    t = dpt_tensors
    padded = tuple(t[f"{size}.padded"].shape[-2:])
    with torch.no_grad():
        out = head(features(t, f"{size}.", padded), padded)
    torch.testing.assert_close(out["logits"][:, ::32], t[f"{size}.logits"], atol=ATOL, rtol=0)
    meta_depth = F.interpolate(t[f"{size}.depth"], size=padded, mode="bilinear", align_corners=False)
    assert out["depth"].shape == meta_depth.shape
    assert_depth_close(out["depth"], meta_depth)
    assert float(meta_depth.max()) > 1.0  # bins over [0.001, 100] m: a real depth range, not a degenerate map


class FixtureBackbone(torch.nn.Module):
    """Returns Meta's encoder output for the one image it was made for: checks what the backbone is given."""

    pad_to = 16

    def __init__(self, padded, feats):
        super().__init__()
        self.padded, self.feats = padded, feats

    def forward(self, images):
        torch.testing.assert_close(images, self.padded, rtol=0, atol=0)
        return self.feats


def test_center_padding_equals_meta_and_dense_model_crops_the_centre(dpt, dpt_tensors):
    """40x72 is centre-padded to 48x80 as Meta's ``CenterPadding(16)``; DenseModel crops the same centre back out."""
    head, _ = dpt
    t = dpt_tensors
    image, padded = t["40x72.image"], t["40x72.padded"]
    ours, (top, left) = center_pad(image, 16)
    torch.testing.assert_close(ours, padded, rtol=0, atol=0)
    assert (top, left) == (4, 4)
    model = DenseModel(FixtureBackbone(padded, features(t, "40x72.", (48, 80))), head, "depth").eval()
    with torch.no_grad():
        depth = model(image)
    meta_depth = F.interpolate(t["40x72.depth"], size=(48, 80), mode="bilinear", align_corners=False)
    assert depth.shape == (1, 1, 40, 72)
    assert_depth_close(depth, meta_depth[..., 4:44, 4:76])


def test_chmv2_head_equals_meta(chmv2_file):
    head, meta = meta_head(chmv2_file, CHMV2, "vitl16")
    assert meta.out_indices == [5, 11, 17, 23]
    assert head.readout == "project" and head.fusion_conv is None
    t = load_arrays(FIXTURES / "chmv2.npz")
    with torch.no_grad():
        out = head(features(t, "", (48, 80)), (48, 80))
    torch.testing.assert_close(out["logits"][:, ::8], t["logits"], atol=ATOL, rtol=0)
    meta_depth = F.interpolate(t["depth"], size=(48, 80), mode="bilinear", align_corners=False)
    assert_depth_close(out["depth"], meta_depth)


def test_formats_are_told_apart(dpt_file, chmv2_file):
    dpt_state = torch.load(dpt_file, weights_only=True)
    chmv2_state = torch.load(chmv2_file, weights_only=True)
    assert detect_format(dpt_state, dpt_file).name == "meta_depther"
    assert detect_format(chmv2_state, chmv2_file).name == "meta_chmv2"
    broken = dict(dpt_state, **{"reassemble_blocks.unknown.weight": torch.zeros(1)})
    with pytest.raises(ExportError, match="reassemble_blocks.unknown.weight"):
        DEPTHER.convert(broken, get_spec("vits16"), "broken.pth")


def test_linear_depth_head_equals_meta():
    """Meta's linear probe (BatchNorm + 1x1 conv, 256 bins over [0.001, 10] m) on the patch grid."""
    t = load_arrays(FIXTURES / "linear.npz")
    head = LinearDepthHead([384], [16]).eval()
    names = {"batchnorm_layer": "batchnorm", "conv_depth": "conv"}
    meta_state = state_dict_from(read_manifest(FIXTURES / "linear.manifest.json"))  # Meta's LinearHead keys
    state = {names[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in meta_state.items()}
    head.load_state_dict(state, strict=True)
    feats = Features(maps=[t["map"]], cls=[t["cls"]], strides=[16], channels=[384], patch_size=16, padded_size=(48, 80))
    with torch.no_grad():
        out = head(feats, (48, 80))
    torch.testing.assert_close(out["logits"], t["logits"], atol=ATOL, rtol=0)
    assert_depth_close(out["depth"], t["depth"])
    assert head.predict(out, (48, 80)).shape == (2, 1, 48, 80)


# -------------------------------------------------------------------------------------- loss, metrics, schedule
@pytest.fixture(scope="module")
def lm():
    return load_arrays(FIXTURES / "losses_metrics.npz")


def test_silog_unbiased_with_warmup_equals_meta(lm):
    loss = SiLogLoss(0.15, unbiased=True, warmup_iters=3)
    pred, gt, mask = lm["silog.pred"][:, 0], lm["silog.gt"][:, 0], lm["silog.mask"][:, 0].bool()
    values = torch.stack([loss(pred, gt, mask) for _ in range(5)])
    torch.testing.assert_close(values, lm["silog.values"], rtol=1e-5, atol=1e-6)
    assert values[0] < values[3]  # the variance term enters after the warm-up
    loss.eval()
    loss(pred, gt, mask)
    assert loss.calls == 3  # evaluation calls do not count


@pytest.mark.parametrize("align", ["none", "least_squares"])
def test_depth_metrics_equal_meta(lm, align):
    names = "".join(chr(c) for c in lm["metrics.names"].tolist()).split(",")
    ours_names = {"a1": "delta1", "a2": "delta2", "a3": "delta3", "log_10": "log10"}
    expected = lm[f"metrics.{align}"]
    for i, (p, g) in enumerate(zip(lm["metrics.pred"][:, 0], lm["metrics.gt"][:, 0])):
        values = image_depth_metrics(p, g, 0.001, 10.0, eigen_crop=True, align=align)
        for j, name in enumerate(names):
            if name == "mae":
                continue
            ours = float(values[ours_names.get(name, name)])
            assert ours == pytest.approx(float(expected[i, j]), rel=1e-4, abs=1e-6), (i, name)


def test_old_masking_differs(lm):
    """Keeping gt == max and rounding the crop bounds changes the scores on this fixture (the options matter)."""
    p, g = lm["metrics.pred"][0, 0], lm["metrics.gt"][0, 0]
    meta = image_depth_metrics(p, g, 0.001, 10.0, eigen_crop=True)
    other = image_depth_metrics(p, g, 0.001, 10.0, eigen_crop=True, max_inclusive=True, crop_rounding="round")
    assert float(meta["rmse"]) != pytest.approx(float(other["rmse"]), rel=1e-6)


def test_one_cycle_schedule_equals_meta(lm):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=3e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    scheduler = WarmupOneCycleLR(optimizer, total_steps=60, warmup_steps=20)
    lrs, betas = [], []
    for _ in range(60):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64), lm["schedule.lr"], rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(betas, dtype=torch.float64), lm["schedule.beta1"], rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------ converter end to end
def test_load_predictor_export_and_head_weights(tmp_path, chmv2_file):
    """A CHMv2-layout file on the 64-wide test ViT: load_predictor, predict at an odd size, export, head.weights."""
    from tasks.base import DenseTask
    from tasks.export import export_predictor

    predictor = load_predictor(chmv2_file, backbone="vit_test", backbone_weights=None)
    assert predictor.config["task"]["meta_format"] == "meta_chmv2"
    assert predictor.eval_settings["flip"] is True
    image = torch.rand(3, 40, 72)
    depth = predictor.predict(image)["depth"]
    assert depth.shape == (40, 72) and torch.isfinite(depth).all() and float(depth.min()) > 0
    export_predictor(predictor, tmp_path / "export")
    again = load_predictor(tmp_path / "export")
    torch.testing.assert_close(again.predict(image)["depth"], depth)

    head_cfg = dict(predictor.config["head"], weights=str(chmv2_file))
    head_cfg = {k: v for k, v in head_cfg.items() if k not in ("in_channels", "strides")}
    task = DenseTask(backbone={"name": "vit_test", "out_indices": [0, 1, 2, 3]}, head=head_cfg)
    for key, value in predictor.model.head.state_dict().items():
        torch.testing.assert_close(task.head.state_dict()[key], value)
    with pytest.raises(ExportError, match="max_depth"):
        load_head_weights(task.head, dict(head_cfg, max_depth=10.0), chmv2_file, "vit_test", [0, 1, 2, 3])
