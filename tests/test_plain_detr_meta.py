"""Plain-DETR against Meta's detector (fixtures of tools/meta_fixtures/plain_detr.py): windowed features, every
output of the head, post-processing through load_predictor, the export round trip."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backbones import build_backbone  # noqa: E402
from backbones.features import Features  # noqa: E402
from heads.detr import PlainDETRHead  # noqa: E402
from heads.detr.meta_checkpoint import META_DETECTOR  # noqa: E402
from tasks import load_predictor  # noqa: E402
from tasks.predictor import ExportError  # noqa: E402

from reference_arrays import load_arrays  # noqa: E402
from seeded_weights import read_manifest, state_dict_from  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "meta" / "detr"
TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Compare at the thread count the fixtures were made with: on the seeded weights, 2 threads' float32 matmul
    blocking alone moves the decoder's logits by up to 2e-4 relative (1 thread: within 1e-4 of Meta)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def io():
    return load_arrays(FIXTURES / "io.npz")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Meta's files rebuilt from the seeded manifests: ``detector.pth`` (``{"model": state_dict}``) and the ViT's
    ``backbone.pth``, both in Meta's key layout."""
    folder = tmp_path_factory.mktemp("meta_detr")
    detector, backbone = folder / "detector.pth", folder / "backbone.pth"
    torch.save({"model": state_dict_from(read_manifest(FIXTURES / "detector.manifest.json"))}, detector)
    torch.save(state_dict_from(read_manifest(FIXTURES / "backbone.manifest.json")), backbone)
    return detector, str(backbone)


@pytest.fixture(scope="module")
def predictor(files):
    return load_predictor(files[0], backbone="vit_test", backbone_weights=files[1])


def _features(io):
    x = io["features"]
    return Features([x], None, [16], [x.shape[1]], 16, tuple(io["images"].shape[-2:]))


def _close(a, b, tol=TOL):
    """Within ``tol``, relative for values above 1 (boxes are in pixels: float32 spacing at 200 px is 1.5e-5)."""
    assert a.shape == b.shape
    assert ((a - b).abs() / b.abs().clamp(min=1.0)).max().item() <= tol


def test_windowed_backbone_equals_meta(io, files):
    backbone = build_backbone("vit_test", weights=files[1], windows=3)
    assert backbone.channels == [64] * 8 and backbone.strides == [16] * 8
    with torch.no_grad():
        features = backbone(io["images"])
    _close(torch.cat(features.maps, 1), io["features"])


def test_converted_head_equals_meta(io, predictor):
    head = predictor.model.head
    config = json.loads((FIXTURES / "config.json").read_text())
    assert isinstance(head, PlainDETRHead)
    assert (head.hidden_dim, head.num_queries, head.num_classes) == (64, config["num_queries_one2one"], 91)
    assert len(head.decoder.layers) == config["dec_layers"] and len(head.encoder.layers) == 1
    head.eval()
    with torch.no_grad():
        out = head(_features(io), tuple(io["images"].shape[-2:]))
    for key in ("pred_logits", "pred_boxes", "pred_boxes_old", "pred_deltas"):
        _close(out[key], io[key])
    for i, aux in enumerate(out["aux_outputs"]):
        _close(aux["pred_logits"], io[f"aux{i}_pred_logits"])
        _close(aux["pred_boxes"], io[f"aux{i}_pred_boxes"])
    _close(out["enc_outputs"]["pred_logits"], io["enc_pred_logits"])
    _close(out["enc_outputs"]["pred_boxes"], io["enc_pred_boxes"])


def test_hybrid_queries_equal_meta(io, predictor):
    """Training-time query set (one-to-one + one-to-many, masked self-attention), dropout off."""
    head = predictor.model.head
    head.train()
    dropouts = [m for m in head.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    try:
        for m in dropouts:
            m.p = 0.0
        with torch.no_grad():
            out = head(_features(io), tuple(io["images"].shape[-2:]))
    finally:
        for m, p in zip(dropouts, saved):
            m.p = p
        head.eval()
    for key in ("pred_logits", "pred_boxes", "pred_logits_one2many", "pred_boxes_one2many"):
        _close(out[key], io["full_" + key])


def test_predictor_detections_equal_meta_postprocess(io, predictor):
    with torch.no_grad():
        detections = predictor.model(io["images"])
    k = io["post_scores"].shape[1]
    for det, boxes, scores, labels in zip(detections, io["post_boxes"], io["post_scores"], io["post_labels"]):
        assert len(det["scores"]) == 1500  # Meta's top-k
        _close(det["boxes"][:k], boxes, 1e-3)
        _close(det["scores"][:k], scores)
        assert torch.equal(det["labels"][:k], labels.long())
    assert predictor.class_names[1] == "person" and predictor.class_names[90] == "toothbrush"
    assert predictor.class_names[12] == "N/A" and len(predictor.class_names) == 91
    assert predictor.config["backbone"]["windows"] == 3


def test_export_round_trip(tmp_path, io, predictor):
    from tasks.export import export_predictor

    export_predictor(predictor, tmp_path / "export")
    again = load_predictor(tmp_path / "export")
    assert isinstance(again.model.head, PlainDETRHead)
    with torch.no_grad():
        a, b = predictor.model(io["images"][:1]), again.model(io["images"][:1])
    _close(a[0]["boxes"], b[0]["boxes"], 0.0)
    _close(a[0]["scores"], b[0]["scores"], 0.0)


def test_converter_errors(tmp_path, files):
    state = torch.load(files[0], weights_only=True)["model"]
    assert META_DETECTOR.matches(state)
    from backbones.registry import get_spec

    with pytest.raises(ExportError, match="ViT features"):
        META_DETECTOR.convert(state, get_spec("convnext_test"), "detector.pth")
    broken = {k: v for k, v in state.items() if not k.startswith("class_embed.0.")}
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(ExportError, match="class_embed.0.weight"):
        load_predictor(tmp_path / "broken.pth", backbone="vit_test", backbone_weights=files[1])
    with pytest.raises(ExportError, match="does not fit"):  # a backbone of another width
        load_predictor(files[0], backbone="vits16", backbone_weights=None)


def test_head_weights_check_windows(predictor, files):
    from tasks.meta_heads import load_head_weights

    head, cfg = predictor.model.head, predictor.config["head"]
    indices = predictor.model.backbone.out_indices
    with pytest.raises(ExportError, match=r"detector\.pth .*backbone\.windows=3.*windows=0"):
        load_head_weights(head, cfg, files[0], "vit_test", indices, 91, {"windows": 0})
    assert load_head_weights(head, cfg, files[0], "vit_test", indices, 91, {"windows": 3})
