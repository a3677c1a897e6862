"""tasks.export / export.py: head-only export, rebuild without Lightning, backbone weights rules, errors, ONNX."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from backbones import build_backbone  # noqa: E402
from heads import LinearSegHead  # noqa: E402
from tasks import SegmentationTask, load_predictor  # noqa: E402
from tasks.export import export_checkpoint  # noqa: E402
from tasks.outputs import OUTPUT_MARKER  # noqa: E402
from tasks.predictor import ExportError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [np.random.default_rng(0).integers(0, 256, size=(70, 100, 3), dtype=np.uint8),
          np.random.default_rng(1).integers(0, 256, size=(45, 61, 3), dtype=np.uint8)]


def _make_ckpt(path: Path, backbone: dict, num_classes: int = 5, seed: int = 0) -> SegmentationTask:
    """A checkpoint as Lightning writes it: state_dict + hyper_parameters, through the task's save hook."""
    torch.manual_seed(seed)
    task = SegmentationTask(backbone=backbone, head={"_target_": "heads.LinearSegHead", "dropout": 0.0},
                            num_classes=num_classes, class_names=[f"c{i}" for i in range(num_classes)])
    with torch.no_grad():
        task.head.conv.weight.normal_(0, 0.5)
        task.head.batchnorm.running_mean.normal_()
        for name, param in task.backbone.named_parameters():
            if param.requires_grad:  # a "trained" backbone differs from its weights source
                param.add_(torch.randn_like(param) * 0.1)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return task.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A local timm-format safetensors of a random vit_test backbone, used as ``backbone.weights``."""
    torch.manual_seed(42)
    path = tmp_path_factory.mktemp("weights") / "vit_test.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone("vit_test").model.state_dict().items()}, str(path))
    return path


def _same_predictions(a, b, tol=1e-6):
    for x, y in zip(a.predict(IMAGES, mode="slide", crop=64, stride=43, tta=False),
                    b.predict(IMAGES, mode="slide", crop=64, stride=43, tta=False)):
        torch.testing.assert_close(x["probs"], y["probs"], atol=tol, rtol=0)
        assert torch.equal(x["labels"], y["labels"])


def test_round_trip_random_init_backbone_is_exported(tmp_path):
    task = _make_ckpt(tmp_path / "a.ckpt", {"name": "vit_test", "weights": None})
    report = export_checkpoint(tmp_path / "a.ckpt", tmp_path / "export")
    assert report["verify_diff"] == 0.0
    folder = tmp_path / "export"
    assert {p.name for p in folder.iterdir()} == {"config.yaml", "head.safetensors", "backbone.safetensors", OUTPUT_MARKER}
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["task"]["kind"] == "segmentation" and config["head"]["_target_"] == "heads.LinearSegHead"
    assert config["backbone"]["out_indices"] == [0, 1, 2, 3] and config["backbone"]["freeze"] == "frozen"
    assert config["num_classes"] == 5 and config["class_names"] == [f"c{i}" for i in range(5)]
    assert config["normalize"]["mean"] == [0.485, 0.456, 0.406] and config["eval"]["crop"] == 512
    assert config["files"]["backbone"] == "backbone.safetensors"
    assert set(load_file(str(folder / "backbone.safetensors"))) == set(task.backbone.state_dict())
    assert set(load_file(str(folder / "head.safetensors"))) == set(task.head.state_dict())
    rebuilt, original = load_predictor(folder), load_predictor(tmp_path / "a.ckpt")
    _same_predictions(rebuilt, original, tol=0)
    with torch.no_grad():  # and both equal the in-memory Lightning task
        x = torch.randn(1, 3, 48, 80)
        torch.testing.assert_close(rebuilt.model(x), task.dense(x), atol=1e-5, rtol=0)


def test_frozen_backbone_with_weights_source_exports_no_backbone(tmp_path, source):
    task = _make_ckpt(tmp_path / "b.ckpt", {"name": "vit_test", "weights": str(source)})
    assert not [k for k in torch.load(tmp_path / "b.ckpt", weights_only=True)["state_dict"] if k.startswith("backbone.")]
    export_checkpoint(tmp_path / "b.ckpt", tmp_path / "export")
    folder = tmp_path / "export"
    assert not (folder / "backbone.safetensors").exists()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["files"]["backbone"] is None and config["backbone_tensors"].startswith("none")
    assert config["backbone"]["weights"] == str(source.resolve())
    rebuilt = load_predictor(folder)
    _same_predictions(rebuilt, load_predictor(tmp_path / "b.ckpt"), tol=0)
    with torch.no_grad():
        x = torch.randn(1, 3, 48, 80)
        torch.testing.assert_close(rebuilt.model(x), task.dense(x), atol=1e-5, rtol=0)


def test_trained_backbone_exports_only_trained_tensors(tmp_path, source):
    task = _make_ckpt(tmp_path / "c.ckpt", {"name": "vit_test", "weights": str(source), "freeze": "last_n", "last_n": 1})
    export_checkpoint(tmp_path / "c.ckpt", tmp_path / "export")
    stored = load_file(str(tmp_path / "export" / "backbone.safetensors"))
    trained = {n for n, p in task.backbone.named_parameters() if p.requires_grad}
    assert set(stored) == trained and all(k.startswith(("model.blocks.3.", "model.norm.")) for k in stored)
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    assert config["backbone_tensors"].startswith("trained") and config["backbone"]["last_n"] == 1
    rebuilt = load_predictor(tmp_path / "export")
    with torch.no_grad():
        x = torch.randn(1, 3, 48, 80)
        torch.testing.assert_close(rebuilt.model(x), task.dense(x), atol=1e-5, rtol=0)


def test_wrong_or_truncated_exports_fail_naming_the_file_or_key(tmp_path):
    _make_ckpt(tmp_path / "a.ckpt", {"name": "vit_test", "weights": None})
    good = tmp_path / "good"
    export_checkpoint(tmp_path / "a.ckpt", good, verify=False)
    config_text = (good / "config.yaml").read_text()

    def fresh(name):
        folder = tmp_path / name
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        return folder

    folder = fresh("classes")  # head trained for another number of classes
    head = LinearSegHead([64] * 4, [16] * 4, num_classes=3)
    save_file(head.state_dict(), str(folder / "head.safetensors"))
    with pytest.raises(ExportError, match=r"head\.safetensors.*size mismatch"):
        load_predictor(folder)

    folder = fresh("width")  # head of a backbone of another width
    save_file(LinearSegHead([32] * 4, [16] * 4, num_classes=5).state_dict(), str(folder / "head.safetensors"))
    with pytest.raises(ExportError, match=r"head\.safetensors.*size mismatch"):
        load_predictor(folder)

    folder = fresh("backbone")  # config names a backbone whose channels the head was not trained on
    (folder / "config.yaml").write_text(config_text.replace("name: vit_test", "name: convnext_test"))
    with pytest.raises(ExportError, match=r"config\.yaml.*head\.in_channels"):
        load_predictor(folder)

    folder = fresh("truncated")
    data = (folder / "head.safetensors").read_bytes()
    (folder / "head.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"head\.safetensors.*truncated"):
        load_predictor(folder)

    for key, line in (("backbone.name", "  name: vit_test\n"), ("head._target_", "  _target_: heads.LinearSegHead\n"),
                      ("files.head", "head: head.safetensors, ")):
        folder = fresh(f"nokey_{key}")
        assert line in config_text
        (folder / "config.yaml").write_text(config_text.replace(line, "", 1))
        with pytest.raises(ExportError, match=rf"config\.yaml: missing key '{key}'"):
            load_predictor(folder)

    folder = fresh("nobackbone")  # random-init backbone without its tensors
    (folder / "backbone.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"backbone\.safetensors"):
        load_predictor(folder)

    (tmp_path / "bad.ckpt").write_bytes((tmp_path / "a.ckpt").read_bytes()[:1000])
    with pytest.raises(ExportError, match=r"bad\.ckpt"):
        load_predictor(tmp_path / "bad.ckpt")


def test_export_cli_with_onnx(tmp_path):
    import onnxruntime as ort

    _make_ckpt(tmp_path / "a.ckpt", {"name": "vit_test", "weights": None})
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), f"ckpt={tmp_path / 'a.ckpt'}",
                           f"out={tmp_path / 'export'}", "onnx=true"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnx vs pytorch max abs diff" in proc.stdout and "max abs diff vs checkpoint 0" in proc.stdout
    predictor = load_predictor(tmp_path / "export")
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 32, 80), (2, 3, 96, 48)):  # other batch sizes and sides than the exported example
        x = torch.randn(*shape)
        (onnx_out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            reference = predictor.model(x).numpy()
        assert onnx_out.shape == reference.shape == (shape[0], 5, *shape[2:])
        assert np.abs(onnx_out - reference).max() < 1e-3
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    assert config["onnx"]["file"] == "model.onnx" and config["onnx"]["max_abs_diff_vs_pytorch"] < 1e-3


def _save_like_lightning(task, path: Path) -> None:
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


_BACKBONE = {"name": "vit_test", "weights": None}
_ONNX_HEADS = {
    "dpt_regression": ("tasks.depth.DepthTask", {"_target_": "heads.dpt.DPTHead", "features": 16, "head_hidden": 8}, None),
    "dpt_bins": ("tasks.depth.DepthTask", {"_target_": "heads.dpt.DPTHead", "features": 16, "head_hidden": 8,
                                           "output": "bins", "num_bins": 8, "readout": "project"}, None),
    "mask2former": ("tasks.SegmentationTask", {"_target_": "heads.mask2former.Mask2FormerHead", "hidden_dim": 16,
                                               "num_queries": 6, "dec_layers": 1, "enc_layers": 1, "num_heads": 2,
                                               "dim_feedforward": 32, "num_points": 64}, 4),
    "detr": ("tasks.detection.DetectionTask", {"_target_": "heads.detr.DETRHead", "hidden_dim": 16, "num_queries": 8,
                                               "enc_layers": 1, "dec_layers": 2, "num_heads": 2, "num_points": 2,
                                               "num_levels": 2, "ffn_dim": 32, "topk": 5}, 3),
}


@pytest.mark.parametrize("name", list(_ONNX_HEADS))
def test_onnx_round_trip_with_other_batch_and_size(tmp_path, name):
    """Each dense head exports with dynamic batch / height / width and matches PyTorch at other shapes."""
    import importlib

    import onnxruntime as ort

    target, head, num_classes = _ONNX_HEADS[name]
    module, cls = target.rsplit(".", 1)
    torch.manual_seed(0)
    extra = {"num_classes": num_classes, "class_names": [f"c{i}" for i in range(num_classes)]} if num_classes else {}
    task = getattr(importlib.import_module(module), cls)(backbone=_BACKBONE, head=head, **extra).eval()
    _save_like_lightning(task, tmp_path / "a.ckpt")
    report = export_checkpoint(tmp_path / "a.ckpt", tmp_path / "export", onnx=True)
    assert report["onnx_diff"] < 1e-3
    predictor = load_predictor(tmp_path / "export")
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 32, 80), (3, 3, 96, 48)):  # the export example is (2, 3, 64, 96)
        x = torch.randn(*shape)
        outputs = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            reference = predictor.model(x)
        if predictor.kind == "detection":
            boxes, scores, labels, logits, raw = (torch.from_numpy(o) for o in outputs)
            assert boxes.shape == (shape[0], 5, 4) and logits.shape == (shape[0], 8, 3) and raw.shape == (shape[0], 8, 4)
            torch.testing.assert_close(boxes, torch.stack([p["boxes"] for p in reference]), atol=1e-3, rtol=0)
            torch.testing.assert_close(scores, torch.stack([p["scores"] for p in reference]), atol=1e-4, rtol=0)
            assert torch.equal(labels, torch.stack([p["labels"] for p in reference]))
            with torch.no_grad():
                padded = predictor.model.backbone(x)
                raw_ref = predictor.model.head(padded, padded.padded_size)
            torch.testing.assert_close(logits, raw_ref["pred_logits"], atol=1e-4, rtol=0)
            torch.testing.assert_close(raw, raw_ref["pred_boxes"], atol=1e-4, rtol=0)
        else:
            (dense,) = outputs
            channels = 1 if predictor.kind == "depth" else num_classes
            assert dense.shape == reference.shape == (shape[0], channels, *shape[2:])
            assert np.abs(dense - reference.numpy()).max() < 1e-3
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    assert config["onnx"]["max_abs_diff_vs_pytorch"] < 1e-3 and config["onnx"]["outputs"]
