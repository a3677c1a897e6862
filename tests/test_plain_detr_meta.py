"""Plain-DETR against Meta's detector (fixtures of tools/meta_fixtures/plain_detr.py): windowed features, every
output of the head, post-processing through load_predictor, the export round trip; and on a batch of two differently
sized images padded to one size with Meta's padding mask."""

import json
import os
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_convert

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backbones import build_backbone  # noqa: E402
from backbones.features import Features  # noqa: E402
from heads.detr import PlainDETRHead  # noqa: E402
from heads.detr.meta_checkpoint import META_DETECTOR  # noqa: E402
from heads.detr.padding_mask import padding_mask, resize_mask  # noqa: E402
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


def _close_decoder_outputs(out: dict, recorded: dict) -> None:
    """The final and every auxiliary decoder output equal Meta's recording."""
    for key in ("pred_logits", "pred_boxes", "pred_boxes_old", "pred_deltas"):
        _close(out[key], recorded[key])
    for i, aux in enumerate(out["aux_outputs"]):
        _close(aux["pred_logits"], recorded[f"aux{i}_pred_logits"])
        _close(aux["pred_boxes"], recorded[f"aux{i}_pred_boxes"])


def test_converted_head_equals_meta(io, predictor):
    head = predictor.model.head
    config = json.loads((FIXTURES / "config.json").read_text())
    assert isinstance(head, PlainDETRHead)
    assert (head.hidden_dim, head.num_queries, head.num_classes) == (64, config["num_queries_one2one"], 91)
    assert len(head.decoder.layers) == config["dec_layers"] and len(head.encoder.layers) == 1
    head.eval()
    with torch.no_grad():
        out = head(_features(io), tuple(io["images"].shape[-2:]))
    _close_decoder_outputs(out, io)
    _close(out["enc_outputs"]["pred_logits"], io["enc_pred_logits"])
    _close(out["enc_outputs"]["pred_boxes"], io["enc_pred_boxes"])


def _train_mode_outputs(head, features, image_size: tuple[int, int]) -> dict:
    """The head's training-time outputs (one-to-one + one-to-many queries) with dropout off, back in eval after."""
    head.train()
    dropouts = [m for m in head.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    try:
        for m in dropouts:
            m.p = 0.0
        with torch.no_grad():
            return head(features, image_size)
    finally:
        for m, p in zip(dropouts, saved):
            m.p = p
        head.eval()


def test_hybrid_queries_equal_meta(io, predictor):
    """Training-time query set (one-to-one + one-to-many, masked self-attention), dropout off."""
    out = _train_mode_outputs(predictor.model.head, _features(io), tuple(io["images"].shape[-2:]))
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


# ---------------------------------------------------------------------------------------------- padded batch
@pytest.fixture(scope="module")
def padded():
    """Meta's run on two differently sized images zero-padded to one size, with its ``NestedTensor`` mask."""
    return load_arrays(FIXTURES / "io_padded.npz")


def _padded_features(padded, mask=True):
    x = padded["features"]
    size = tuple(padded["padded_images"].shape[-2:])
    return Features([x], None, [16], [x.shape[1]], 16, size,
                    padding_mask=padding_mask(padded["sizes"].tolist(), size) if mask else None)


def _eval_head(predictor):
    head = predictor.model.head
    head.eval()
    return head


def test_padded_batch_mask_and_windowed_features_equal_meta(padded, files):
    """Our pixel mask is Meta's; resampled to the feature map it is the mask Meta's windows wrapper gives; the
    windowed backbone (which sees the padding, as Meta's does) gives Meta's features of the padded batch."""
    images, size = padded["padded_images"].float(), tuple(padded["padded_images"].shape[-2:])
    assert torch.equal(padding_mask(padded["sizes"].tolist(), size), padded["pixel_mask"])
    assert torch.equal(resize_mask(padded["pixel_mask"], (8, 11)), padded["feature_mask"])
    assert padded["feature_mask"][1].sum() == 88 - 6 * 8  # 90 x 120 px: 6 x 8 of 8 x 11 cells (a partial row)
    backbone = build_backbone("vit_test", weights=files[1], windows=3)
    with torch.no_grad():
        features = backbone(images)
    _close(torch.cat(features.maps, 1), padded["features"])


def test_padded_batch_head_equals_meta(padded, predictor):
    """Every output of the head on a padded batch (masked position encoding, encoder key mask, masked and clipped
    proposals, -100 on padded keys in the decoder, boxes clipped to each image's valid extent) equals Meta's."""
    head = _eval_head(predictor)
    with torch.no_grad():
        out = head(_padded_features(padded), tuple(padded["padded_images"].shape[-2:]))
    _close_decoder_outputs(out, padded)
    enc = out["enc_outputs"]
    _close(enc["pred_logits"][..., :padded["enc_pred_logits"].shape[-1]], padded["enc_pred_logits"])
    _close(enc["pred_boxes"], padded["enc_pred_boxes"])
    _close(enc["pred_boxes_old"], padded["enc_pred_boxes_old"])
    # the small image's boxes stay inside its valid extent: 6 x 8 cells of 16 px (Meta clips to the cells)
    xyxy = box_convert(out["pred_boxes"][1], "cxcywh", "xyxy")
    assert xyxy[:, 2].max() <= 8 * 16 and xyxy[:, 3].max() <= 6 * 16
    assert not torch.allclose(out["pred_logits"], head(_padded_features(padded, mask=False),
                                                       tuple(padded["padded_images"].shape[-2:]))["pred_logits"])


def test_padded_batch_hybrid_queries_equal_meta(padded, predictor):
    out = _train_mode_outputs(predictor.model.head, _padded_features(padded),
                              tuple(padded["padded_images"].shape[-2:]))
    for key in ("pred_logits", "pred_boxes", "pred_logits_one2many", "pred_boxes_one2many"):
        _close(out[key], padded["full_" + key])


def test_padded_batch_detections_through_the_task_equal_meta(padded, files, predictor):
    """Validation of a collated batch (DetectionTask.predict_boxes: images padded to the largest, the mask from each
    image's size) gives Meta's post-processed detections at each image's own size."""
    from tasks.detection import DetectionTask

    config = predictor.config
    task = DetectionTask(backbone=config["backbone"], head=dict(config["head"], weights=str(files[0])),
                         num_classes=91).eval()
    images = padded["padded_images"].float()
    sizes = [tuple(s) for s in padded["sizes"].tolist()]
    metas = [{"image_size": s, "orig_size": s} for s in sizes]
    detections = task.predict_boxes({"image": images, "meta": metas})
    k = padded["post_scores"].shape[1]
    for det, boxes, scores, labels in zip(detections, padded["post_boxes"], padded["post_scores"],
                                          padded["post_labels"]):
        _close(det["boxes"][:k], boxes, 1e-3)
        _close(det["scores"][:k], scores)
        assert torch.equal(det["labels"][:k], labels.long())


def test_padded_batch_members_as_meta_implies(padded, predictor):
    """What Meta's semantics imply (the fixture script checks them on Meta's model too): the image that fills the
    padded size gives its unbatched, unmasked result; the padded image gives the result of running it alone padded
    to the same size with its mask (images of a batch do not interact); an all-valid mask is no mask, bit for bit."""
    head = _eval_head(predictor)
    size = tuple(padded["padded_images"].shape[-2:])
    with torch.no_grad():
        batch = head(_padded_features(padded), size)
        x, mask = padded["features"], padding_mask(padded["sizes"].tolist(), size)
        alone = head(Features([x[:1]], None, [16], [x.shape[1]], 16, size), size)
        small = head(Features([x[1:]], None, [16], [x.shape[1]], 16, size, padding_mask=mask[1:]), size)
        valid = head(Features([x[:1]], None, [16], [x.shape[1]], 16, size, padding_mask=mask[:1]), size)
    for key in ("pred_logits", "pred_boxes"):
        _close(alone[key][0], batch[key][0], 1e-5)
        _close(small[key][0], batch[key][1], 1e-5)
        assert torch.equal(valid[key], alone[key])
