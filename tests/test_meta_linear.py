"""Meta's linear heads and evaluation conventions against fixtures from Meta's code
(tools/meta_fixtures/linear_heads.py): the classifier and linear-seg converters, the shrinking sliding window, Meta's
TTA views and averaging, ``head.weights``, errors. Meta's head files are rebuilt from their seeded manifests and
saved in Meta's layout (``classifier_head.pth`` flat, ``model_final.pth`` as ``{"model": ..., "optimizer": ...}``)
before being read."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from backbones.features import Features  # noqa: E402
from backbones.registry import get_spec  # noqa: E402
from dense_data.transforms import normalize  # noqa: E402
from tasks import ClassificationTask, SegmentationTask, load_predictor  # noqa: E402
from tasks.inference import dense_inference, window_size  # noqa: E402
from tasks.loading import build_head  # noqa: E402
from tasks.meta_heads import detect_format, read_meta_file  # noqa: E402
from tasks.predictor import ExportError, Predictor  # noqa: E402
from tasks.tta import TTA, average_views, make_views, to_probs, tta_inference  # noqa: E402
from reference_arrays import load_arrays  # noqa: E402
from seeded_weights import read_manifest, state_dict_from, write_meta_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "meta" / "linear"


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    return write_meta_file(FIXTURES / "classifier_head.manifest.json", tmp_path_factory.mktemp("meta_linear"))


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory):
    return write_meta_file(FIXTURES / "model_final.manifest.json", tmp_path_factory.mktemp("meta_linear"))


@pytest.fixture(scope="module")
def data():
    return load_arrays(FIXTURES / "linear.npz")


@pytest.fixture(scope="module")
def info():
    return json.loads((FIXTURES / "info.json").read_text())


def _convert(path, backbone):
    state = read_meta_file(path)
    fmt = detect_format(state, path)
    return fmt, fmt.convert(state, get_spec(backbone), str(path))


def _features(maps, cls=None):
    return Features(maps=maps, cls=cls, strides=[16] * len(maps), channels=[m.shape[1] for m in maps], patch_size=16,
                    padded_size=(maps[0].shape[-2] * 16, maps[0].shape[-1] * 16))


@pytest.fixture(scope="module")
def seg_fn(data, seg_file):
    """The fixture's toy backbone + our LinearSegHead converted from Meta's model_final.pth: crops -> logits."""
    _, meta = _convert(seg_file, "vit_test")
    head = build_head(meta.head, [64], [16], meta.num_classes).eval()
    head.load_state_dict(meta.state)
    proj = nn.Conv2d(3, 64, 4, stride=4).eval()
    toy = state_dict_from(read_manifest(FIXTURES / "toy_backbone.manifest.json"))
    proj.load_state_dict({k.removeprefix("proj."): v for k, v in toy.items()})

    @torch.no_grad()
    def fn(crops):
        y = proj(crops)
        size = tuple(crops.shape[-2:])
        return head.predict(head(_features([y + y.mean((2, 3), keepdim=True)]), size), size)

    return fn


def test_classifier_converter_equals_meta_hub_wrapper(data, classifier_file):
    fmt, meta = _convert(classifier_file, "vits16")
    assert fmt.name == "meta_linear_classifier" and meta.kind == "classification"
    assert meta.out_indices == [11] and meta.num_classes == 10
    head = build_head(meta.head, [384], [16], meta.num_classes).eval()
    head.load_state_dict(meta.state)
    patches = data["patch_tokens"]  # (1, 16, 384) -> (1, 384, 4, 4)
    maps = patches.transpose(1, 2).reshape(1, 384, 4, 4)
    logits = head.predict(head(_features([maps], [data["cls_token"]]), (64, 64)), (64, 64))
    torch.testing.assert_close(logits, data["cls_logits"], atol=1e-4, rtol=0)


def test_linear_seg_converter_equals_meta_linear_head(data, seg_file):
    fmt, meta = _convert(seg_file, "vit_test")
    assert fmt.name == "meta_linear_seg" and meta.out_indices == [3] and meta.num_classes == 6
    head = build_head(meta.head, [64], [16], meta.num_classes).eval()
    head.load_state_dict(meta.state)
    with torch.no_grad():
        out = head.predict(head(_features([data["seg_features"]]), (80, 112)), (20, 28))
    torch.testing.assert_close(out, data["seg_predict"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["small", "one_side", "large"])
def test_slide_shrink_equals_meta_slide_inference(case, data, info, seg_fn):
    crop, stride = info["slide"][case]["crop"], info["slide"][case]["stride"]
    image = data[f"slide_{case}_image"]
    ours = dense_inference(seg_fn, [image], "slide", crop, stride, batch_size=3, small_image="shrink")[0]
    torch.testing.assert_close(ours, data[f"slide_{case}_logits"], atol=1e-4, rtol=0)
    if case == "small":  # padding (our default) is a different convention: the outputs really differ
        padded = dense_inference(seg_fn, [image], "slide", crop, stride, small_image="pad")[0]
        assert (padded - data[f"slide_{case}_logits"]).abs().max() > 1e-2


def test_window_size_known_answers():
    assert window_size(400, 500, (512, 512), "shrink") == (400, 400)   # both sides smaller: square of the short side
    assert window_size(400, 600, (512, 512), "shrink") == (400, 512)   # one side smaller: cut to the image
    assert window_size(600, 900, (512, 512), "shrink") == (512, 512)
    assert window_size(400, 600, (512, 512), "pad") == (512, 512)
    with pytest.raises(ValueError, match="small_image"):
        window_size(4, 4, (8, 8), "crop")


def _meta_tta(info) -> TTA:
    t = info["tta"]
    return TTA(flip=True, scales=tuple(t["ratios"]), short_side=t["short_side"], multiple=32, antialias=True)


def _meta_view(data, k, flip):
    """Meta's view of ratio ``k``, mirrored or not (the fixture stores the plain views: Meta's mirrors flip them)."""
    view = data[f"tta_view{k}"]
    return view.flip(-1) if flip else view


def test_tta_views_equal_meta_views(data, info):
    tta = _meta_tta(info)
    sizes = [list(tta.view_size(info["tta"]["image_size"], r)) for r in info["tta"]["ratios"]]
    assert sizes == info["tta"]["view_sizes"][:5]
    ours = make_views([normalize(data["tta_image"].numpy())], tta)
    n = len(info["tta"]["ratios"])
    for k in range(n):  # ours: (r, plain), (r, mirror) per ratio; Meta's: all plain, then all mirrored
        for flip in (0, 1):
            meta_view = _meta_view(data, k, flip)
            assert ours[2 * k + flip].shape == meta_view.shape
            # Meta resizes the uint8 picture with PIL (rounded to uint8), we resize the float tensor
            assert (ours[2 * k + flip] - meta_view).abs().max() < 0.03


def test_tta_averaging_equals_meta(data, info, seg_fn):
    tta, t = _meta_tta(info), info["tta"]
    n = len(t["ratios"])
    meta_views = [_meta_view(data, k, flip) for k in range(n) for flip in (0, 1)]  # in our view order
    outputs = dense_inference(seg_fn, meta_views, "slide", t["crop"], t["stride"], small_image="shrink")
    probs = average_views(outputs, tta, [t["image_size"]], lambda s: to_probs(s, "logits", "softmax"))[0]
    torch.testing.assert_close(probs, data["tta_probs"], atol=1e-4, rtol=0)
    # the whole pipeline from the picture: only the uint8 rounding of Meta's resized views differs
    full = tta_inference(seg_fn, [normalize(data["tta_image"].numpy())], tta, "slide", t["crop"], t["stride"],
                         small_image="shrink", value=lambda s: to_probs(s, "logits", "softmax"))[0]
    assert (full - data["tta_probs"]).abs().max() < 5e-3
    assert (full.argmax(0) == data["tta_probs"].argmax(0)).float().mean() > 0.99


def test_m2f_scores_softmax_versus_normalize():
    scores = torch.tensor([[[0.9]], [[0.1]], [[0.0]]])
    torch.testing.assert_close(to_probs(scores, "scores", "softmax"), scores.softmax(0))
    torch.testing.assert_close(to_probs(scores, "scores", "auto"), scores / scores.sum(0))
    with pytest.raises(ValueError, match="activation"):
        to_probs(scores, "scores", "sigmoid")


class _Recorder(nn.Module):
    """A dense 'model' that records the sizes it sees: class scores from the input's channels."""

    def __init__(self):
        super().__init__()
        self.sizes = []
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, images):
        self.sizes.append(tuple(images.shape[-2:]))
        return self.conv(images)


def test_predictor_meta_m2f_preset_sizes_views_and_windows():
    model = _Recorder()
    predictor = Predictor(model, "segmentation", num_classes=4, score_type="scores")
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    result = predictor.predict(image, preset="meta_m2f", batch_size=1)
    assert result["probs"].shape == (4, 40, 60)
    torch.testing.assert_close(result["probs"].sum(0), torch.ones(40, 60))
    # short side 896 x (0.9, 0.95) rounded up to 32 -> 832, 864 (< 896: window cut to the image), 896, 940, 985;
    # views 832x1248, 864x1296, 896x1344 take 1x2 windows, 940x1410 and 985x1478 2x2; each view also mirrored
    assert set(model.sizes) == {(832, 896), (864, 896), (896, 896)}
    assert len(model.sizes) == 2 * (2 + 2 + 2 + 4 + 4)


def test_meta_preset_in_validation_settings(tmp_path):
    task = SegmentationTask(backbone={"name": "vit_test", "weights": None, "out_indices": [-1]},
                            head={"_target_": "heads.LinearSegHead"}, num_classes=3, eval_preset="meta_m2f")
    assert (task.eval_mode, task.eval_crop, task.eval_stride, task.eval_small_image) == ("slide", 896, 596, "shrink")
    assert task.eval_tta.short_side == 896 and len(task.eval_tta.views()) == 10
    flip = SegmentationTask(backbone={"name": "vit_test", "weights": None, "out_indices": [-1]},
                            head={"_target_": "heads.LinearSegHead"}, num_classes=3, eval_tta={"flip": True})
    flip.eval()
    image = torch.randn(3, 32, 48)
    with torch.no_grad():
        probs = flip.predict_scores([image], [(16, 24)])[0]
        plain, mirrored = flip.dense(image[None])[0], flip.dense(image.flip(-1)[None])[0].flip(-1)
    expected = (to_probs(plain) + to_probs(mirrored)) / 2
    expected = torch.nn.functional.interpolate(expected[None], (16, 24), mode="bilinear", align_corners=False)[0]
    assert probs.shape == (3, 16, 24)
    assert probs.argmax(0).eq(expected.argmax(0)).float().mean() > 0.95


def test_load_predictor_classifier_with_imagenet_names(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dinov3_vit_test_imagenet1k_linear_head.pth"
    torch.save(nn.Linear(2 * 64, 1000).state_dict(), path)
    predictor = load_predictor(path, backbone="vit_test", backbone_weights=None)
    assert predictor.kind == "classification" and predictor.class_names[:2] == ["tench", "goldfish"]
    result = predictor.predict(np.zeros((32, 32, 3), dtype=np.uint8))
    assert result["probs"].shape == (1000,) and 0 <= result["label"] < 1000


def test_load_predictor_linear_seg_uses_meta_linear_eval(tmp_path, seg_file):
    predictor = load_predictor(seg_file, backbone="vit_test", backbone_weights=None)
    assert predictor.kind == "segmentation" and predictor.class_names[0] == "class_0"
    assert predictor.eval_settings["small_image"] == "shrink" and predictor.eval_settings["tta"]["short_side"] == 512
    result = predictor.predict(np.zeros((24, 36, 3), dtype=np.uint8), tta={"short_side": 32})
    assert result["probs"].shape == (6, 24, 36)
    ade = tmp_path / "model_final.pth"
    state = {f"segmentation_model.1.batchnorm_layer.{k}": torch.ones(64) for k in ("weight", "running_var")}
    state |= {f"segmentation_model.1.batchnorm_layer.{k}": torch.zeros(64) for k in ("bias", "running_mean")}
    state |= {"segmentation_model.1.conv.weight": torch.zeros(150, 64, 1, 1),
              "segmentation_model.1.conv.bias": torch.zeros(150)}
    torch.save({"model": state, "optimizer": {}}, ade)
    assert load_predictor(ade, backbone="vit_test").class_names[:2] == ["wall", "building"]


def test_head_weights_initialise_training(seg_file):
    task = SegmentationTask(backbone={"name": "vit_test", "weights": None, "out_indices": [-1]},
                            head={"_target_": "heads.LinearSegHead", "weights": str(seg_file)}, num_classes=6)
    state = read_meta_file(seg_file)
    torch.testing.assert_close(task.head.conv.weight, state["segmentation_model.1.conv.weight"])
    torch.testing.assert_close(task.head.batchnorm.running_var,
                               state["segmentation_model.1.batchnorm_layer.running_var"])
    assert "weights" in task.hparams.head  # recorded, but checkpoints rebuild the head without it
    with pytest.raises(ExportError, match=r"backbone.out_indices=\[3\]"):
        SegmentationTask(backbone={"name": "vit_test", "weights": None},
                         head={"_target_": "heads.LinearSegHead", "weights": str(seg_file)}, num_classes=6)
    with pytest.raises(ExportError, match="6 classes, the data has 5"):
        SegmentationTask(backbone={"name": "vit_test", "weights": None, "out_indices": [-1]},
                         head={"_target_": "heads.LinearSegHead", "weights": str(seg_file)}, num_classes=5)
    with pytest.raises(ExportError, match="LinearSegHead, but the config builds a LinearClassifier"):
        ClassificationTask(backbone={"name": "vit_test", "weights": None, "out_indices": [-1]},
                           head={"_target_": "heads.LinearClassifier", "weights": str(seg_file)}, num_classes=6)


def test_errors_name_the_file_and_the_widths(tmp_path, classifier_file, seg_file):
    with pytest.raises(ExportError, match=r"classifier_head.pth.*2 x 768 = 1536.*width 384 \(vits16, vits16plus\)"):
        _convert(classifier_file, "vitb16")
    with pytest.raises(ExportError, match="no class token"):
        _convert(classifier_file, "convnext_tiny")
    with pytest.raises(ExportError, match=r"model_final.pth.*64 channels.*384 per layer"):
        _convert(seg_file, "vits16")
    with pytest.raises(ExportError, match="does not fit|64 channels"):
        load_predictor(seg_file, backbone="vits16", backbone_weights=None)
    bad = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ExportError, match=r"other.pth: keys .* match none of Meta's released head formats"):
        load_predictor(bad, backbone="vit_test")
    no_bn = tmp_path / "no_bn.pth"
    torch.save({"model": {"segmentation_model.1.conv.weight": torch.zeros(6, 64, 1, 1),
                          "segmentation_model.1.conv.bias": torch.zeros(6)}}, no_bn)
    with pytest.raises(ExportError, match="no_bn.pth.*use_batchnorm=False"):
        _convert(no_bn, "vit_test")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(classifier_file.read_bytes()[:100])
    with pytest.raises(ExportError, match="truncated.pth"):
        load_predictor(truncated, backbone="vit_test")


def test_predict_cli_with_a_meta_head_and_a_preset(tmp_path, capsys, seg_file):
    import predict
    from PIL import Image

    Image.fromarray(np.full((24, 36, 3), 90, dtype=np.uint8)).save(tmp_path / "a.png")
    args = [f"ckpt={seg_file}", f"input={tmp_path / 'a.png'}", f"output={tmp_path / 'out'}", "backbone=vit_test"]
    assert predict.main(args + ["eval=meta_linear"]) == 0
    assert Image.open(tmp_path / "out" / "a_labels.png").size == (36, 24)
    assert predict.main(args + ["eval=meta_nothing"]) == 2
    assert "unknown evaluation preset 'meta_nothing'" in capsys.readouterr().err
