"""ONNX export of Plain-DETR (Meta's detector structure, windowed features) through tasks/export.py: the check's
tie rule at the top-k and its cut-off, the raw boxes normalised, a tiny windowed detector exported and run with
onnxruntime at other batch sizes and sizes, and (DINOV3_SLOW_TESTS=1) the seeded Meta detector."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tasks import load_predictor  # noqa: E402
from tasks.detection import DetectionTask  # noqa: E402
from tasks.export import ONNX_TOLERANCE, _detection_diff, _DetectionOutputs, export_checkpoint  # noqa: E402

from seeded_weights import write_meta_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "meta" / "detr"
_SLOW = not os.environ.get("DINOV3_SLOW_TESTS")
TINY = dict(hidden_dim=32, num_heads=2, enc_layers=1, enc_ffn_dim=32, dec_layers=1, dec_ffn_dim=32, rpe_hidden_dim=8,
            num_queries=6, num_queries_one2many=0, one_to_many_k=0, proposal_min_size=16.0, enc_dropout=0.0, topk=10)


def _outputs(scores, labels, boxes, logits=None, raw=None):
    """The five detection outputs of one image as ``_DetectionOutputs`` gives them (batch of one)."""
    logits = torch.zeros(1, 3, 2) if logits is None else logits
    raw = torch.full((1, 3, 4), 0.5) if raw is None else raw
    return [torch.tensor([boxes], dtype=torch.float32), torch.tensor([scores]), torch.tensor([labels]), logits, raw]


def test_detection_diff_accepts_reordered_ties_and_cut_off_swaps_only():
    """Tied scores may come in another order and another tied entry may be kept at the cut-off; nothing else."""
    boxes = [[0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4], [7, 7, 9, 9]]
    reference = _outputs([0.9, 0.5, 0.5, 0.3], [1, 0, 2, 1], boxes)
    size, tol = 100, ONNX_TOLERANCE
    assert _detection_diff(reference, reference, tol, size) == 0.0
    reordered = _outputs([0.9, 0.5, 0.5, 0.3], [1, 2, 0, 1], [boxes[0], boxes[2], boxes[1], boxes[3]])
    assert _detection_diff(reordered, reference, tol, size) == 0.0
    # the last kept entry swapped for another one that ties with it (PyTorch cut it off, ONNX kept it)
    cut_off = _outputs([0.9, 0.5, 0.5, 0.3 + 2e-5], [1, 0, 2, 0], [*boxes[:3], [40, 40, 60, 60]])
    assert _detection_diff(cut_off, reference, tol, size) == pytest.approx(2e-5, abs=1e-7)
    # a wrong label, a moved box, a detection that PyTorch does not have and that ties with nothing: the positional diff
    wrong_label = _outputs([0.9, 0.5, 0.5, 0.3], [1, 2, 2, 1], [boxes[0], boxes[2], boxes[1], boxes[3]])
    assert _detection_diff(wrong_label, reference, tol, size) == 2.0
    moved = _outputs([0.9, 0.5, 0.5, 0.3], [1, 2, 0, 1], [boxes[0], boxes[2], [5, 5, 25, 20], boxes[3]])
    assert _detection_diff(moved, reference, tol, size) == 2.0
    stranger = _outputs([0.9, 0.5, 0.5, 0.3], [1, 2, 0, 1], [[50, 50, 60, 60], boxes[2], boxes[1], boxes[3]])
    assert _detection_diff(stranger, reference, tol, size) == 2.0
    # more cut-off swaps than PyTorch has tied entries at its cut-off
    reference = _outputs([0.9, 0.5, 0.3015, 0.3], [1, 0, 2, 1], boxes)
    two_swaps = _outputs([0.9, 0.5, 0.3008, 0.3001], [1, 0, 0, 0], [*boxes[:2], [40, 40, 60, 60], [0, 40, 9, 60]])
    assert _detection_diff(two_swaps, reference, tol, size) == 2.0
    one_swap = _outputs([0.9, 0.5, 0.3015, 0.3001], [1, 0, 2, 0], [*boxes[:3], [0, 40, 9, 60]])
    assert _detection_diff(one_swap, reference, tol, size) == pytest.approx(1e-4, abs=1e-6)
    # raw outputs that differ are never excused by the tie rule
    raw = torch.full((1, 3, 4), 0.5)
    raw[0, 0, 0] += 2 * tol
    assert _detection_diff(_outputs([0.9, 0.5, 0.3015, 0.3001], [1, 0, 2, 0], [*boxes[:3], [0, 40, 9, 60]], raw=raw),
                           reference, tol, size) == 1.0


def _tiny_detector(tmp_path, windows: int) -> Path:
    """A Lightning-style checkpoint of a tiny Plain-DETR on ``vit_test`` read through ``windows x windows`` windows.

    The ViT's layer scales are 0.5 instead of timm's 1e-5, so its blocks (and RoPE) count. The last class layer has
    zero weights and one bias per class: every query scores the same per class, so the top-k (6 queries x 3
    classes, 10 kept) has exact ties, also at its cut-off, as a trained detector's near-equal scores (onnxruntime
    and PyTorch happen to order these alike; the tie rule itself is tested by hand above).
    """
    torch.manual_seed(0)
    task = DetectionTask(backbone={"name": "vit_test", "weights": None, "windows": windows, "out_indices": [1, 3]},
                         head={"_target_": "heads.detr.PlainDETRHead", **TINY}, num_classes=3,
                         class_names=["a", "b", "c"]).eval()
    with torch.no_grad():
        for name, param in task.backbone.named_parameters():
            if name.split(".")[-1].startswith("gamma"):
                param.fill_(0.5)
        last = task.head.class_embed[-2]  # the last decoder layer's classifier (the encoder's comes after it)
        last.weight.zero_()
        last.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
        for box in task.head.bbox_embed:  # boxes that move away from the proposals
            box.layers[-1].weight.normal_(0, 0.1)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "detector.ckpt")
    return tmp_path / "detector.ckpt"


def test_raw_pixel_boxes_are_normalised_for_onnx(tmp_path):
    """Plain-DETR's pred_boxes are input pixels; the ONNX outputs carry them normalised, as DETRHead's."""
    predictor = load_predictor(_tiny_detector(tmp_path, windows=0))
    model = predictor.model
    images = torch.randn(2, 3, 96, 120)  # padded to 96 x 128
    with torch.no_grad():
        boxes, scores, labels, logits, raw = _DetectionOutputs(model)(images)
        features = model.backbone(images)
        outputs = model.head(features, features.padded_size)
    assert features.padded_size == (96, 128)
    torch.testing.assert_close(raw, outputs["pred_boxes"] / torch.tensor([128.0, 96.0, 128.0, 96.0]), atol=0, rtol=0)
    assert float(outputs["pred_boxes"].amax()) > 2 and 0 <= float(raw.amin()) and float(raw.amax()) <= 1
    torch.testing.assert_close(logits, outputs["pred_logits"], atol=0, rtol=0)
    assert scores.shape == labels.shape == (2, 10) and boxes.shape == (2, 10, 4)
    assert float(boxes[..., 2].amax()) <= 120 and float(boxes[..., 3].amax()) <= 96  # clipped to the input


@pytest.mark.parametrize("windows", [1, pytest.param(2, marks=pytest.mark.skipif(
    _SLOW, reason="set DINOV3_SLOW_TESTS=1 (about 2 min of CPU: five backbone passes are traced)"))])
def test_windowed_plain_detr_onnx_with_other_batch_and_size(tmp_path, windows):
    """Export through the windows wrapper (1: one window + the resized global view; 2: four windows of symbolic
    sides + the global view) with dynamic batch / size; onnxruntime at shapes other than the example's
    (2, 3, 128 n, 192 n) matches PyTorch, raw outputs within 1e-4."""
    import onnxruntime as ort

    report = export_checkpoint(_tiny_detector(tmp_path, windows), tmp_path / "export", onnx=True)
    assert report["verify_diff"] == 0.0 and report["onnx_diff"] <= 1e-4
    predictor = load_predictor(tmp_path / "export")
    assert predictor.config["backbone"]["windows"] == windows
    module = _DetectionOutputs(predictor.model).eval()
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    for shape in ((1, 3, 96, 144), (3, 3, 160, 80)):
        images = torch.randn(*shape)
        outputs = [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]
        with torch.no_grad():
            reference = list(module(images))
            features = predictor.model.backbone(images)
            raw = predictor.model.head(features, features.padded_size)
        height, width = shape[2:]
        assert outputs[0].shape == (shape[0], 10, 4) and outputs[3].shape == (shape[0], 6, 3)
        torch.testing.assert_close(outputs[3], raw["pred_logits"], atol=1e-4, rtol=0)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        torch.testing.assert_close(outputs[4] * scale, raw["pred_boxes"], atol=1e-4 * max(height, width), rtol=0)
        assert _detection_diff(outputs, reference, ONNX_TOLERANCE, max(height, width)) <= 1e-4


@pytest.mark.skipif(_SLOW, reason="set DINOV3_SLOW_TESTS=1 (about 5 min of CPU: 3 x 3 windows + a global view "
                                  "of 4 blocks are traced, the ONNX graph is 10 ViT passes)")
def test_seeded_meta_detector_onnx(tmp_path):
    """Meta's detector (seeded weights in Meta's file layout, read through load_predictor) passes the export check."""
    detector = write_meta_file(FIXTURES / "detector.manifest.json", tmp_path)
    backbone = write_meta_file(FIXTURES / "backbone.manifest.json", tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = export_checkpoint(detector, tmp_path / "export", onnx=True, backbone="vit_test",
                                   backbone_weights=str(backbone))
    finally:
        torch.set_num_threads(threads)
    assert report["onnx_diff"] <= ONNX_TOLERANCE
