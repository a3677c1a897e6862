"""Forward passes of the backbone and the heads on fake CUDA tensors: catches host / device mixing without a GPU.

``torch._subclasses.FakeTensorMode`` gives tensors a device and a shape but no data, and raises
``FakeTensorDeviceMismatchError`` where an operation mixes a CUDA tensor with a CPU one, as a GPU would. The modules
are built on the CPU and their parameters and buffers faked onto ``cuda`` (``functional_call``); every tensor the
code creates on its own inside the mode is fake too. Data-dependent steps (``.item()``, the Hungarian matcher, losses)
and backward passes cannot run on fake tensors: those are left to a real GPU (``benchmarks/run_all.sh --device cuda``).
"""

import pytest
import torch
from torch.func import functional_call

from backbones import build_backbone
from backbones.features import Features
from heads import LinearSegHead
from heads.detr import DETRHead, PlainDETRHead
from heads.mask2former import Mask2FormerHead
from heads.smp import DECODERS, SMPHead
from tasks.predictor import DenseModel

fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")

CUDA = torch.device("cuda")


def fake_call(module: torch.nn.Module, make_inputs, then=None):
    """``module(*make_inputs())`` with its parameters, buffers and inputs on fake CUDA; ``then(module, out)`` after."""
    mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        state = {name: mode.from_tensor(t).to(CUDA)
                 for name, t in [*module.named_parameters(), *module.named_buffers()]}
    with mode:  # no default-device context: a tensor made without device= must land on the CPU, as it would
        out = functional_call(module, state, make_inputs())
        if then is not None:
            out = then(module, out)
    return out


def _fake_cuda_available() -> bool:
    """Whether this torch build makes fake CUDA tensors (a CPU-only build may not)."""
    try:
        fake_call(torch.nn.Linear(4, 2), lambda: (torch.randn(3, 4, device=CUDA),))
    except Exception:
        return False
    return True


pytestmark = pytest.mark.skipif(not _fake_cuda_available(), reason="this torch build cannot make fake CUDA tensors")


def vit_features(layers: int = 4, channels: int = 32, side: int = 4, batch: int = 2, images: bool = False) -> Features:
    """Random ViT-like ``Features`` on CUDA (fake inside ``fake_call``)."""
    return Features(maps=[torch.randn(batch, channels, side, side, device=CUDA) for _ in range(layers)],
                    cls=[torch.randn(batch, channels, device=CUDA) for _ in range(layers)], strides=[16] * layers,
                    channels=[channels] * layers, patch_size=16, padded_size=(16 * side, 16 * side),
                    images=torch.randn(batch, 3, 16 * side, 16 * side, device=CUDA) if images else None)


def test_fake_cuda_catches_mixing():
    """The check itself: a CUDA tensor meeting a CPU one fails, as on a GPU."""
    with pytest.raises(Exception, match="device"):
        fake_call(torch.nn.Linear(4, 2), lambda: (torch.randn(3, 4, device="cpu"),))


def test_backbone_and_dense_model():
    backbone = build_backbone("vit_test", weights=None).eval()
    features = fake_call(backbone, lambda: (torch.randn(2, 3, 48, 80, device=CUDA),))
    assert all(m.device.type == "cuda" for m in features.maps)
    model = DenseModel(backbone, LinearSegHead(backbone.channels, backbone.strides, 7), "segmentation").eval()
    with torch.inference_mode():
        native = fake_call(model, lambda: (torch.randn(2, 3, 64, 64, device=CUDA), True, False))
        full = fake_call(model, lambda: (torch.randn(2, 3, 64, 64, device=CUDA),))
    assert native.device.type == full.device.type == "cuda" and full.shape == (2, 7, 64, 64)


@pytest.mark.parametrize("neck,layout", [("pyramid", "projected"), ("adapter", "meta")])
def test_mask2former(neck, layout):
    head = Mask2FormerHead([32] * 4, [16] * 4, 5, hidden_dim=32, num_heads=4, dec_layers=2, enc_layers=1, neck=neck,
                           pixel_decoder_layout=layout, num_points=64,
                           adapter={"num_heads": 4} if neck == "adapter" else None).train()
    scores = fake_call(head, lambda: (vit_features(images=True), (64, 64)),
                       lambda m, out: (m.predict(out, (64, 64)), m.predict_native(out)))
    assert scores[0].device.type == "cuda" and scores[0].shape == (2, 5, 64, 64)


@pytest.mark.parametrize("cls,views", [(DETRHead, 1), (PlainDETRHead, 2)])
def test_detr_heads(cls, views):
    n = 4 * views
    small = dict(hidden_dim=32, num_heads=4, num_queries=20)
    if cls is PlainDETRHead:
        small.update(enc_layers=1, dec_layers=2, enc_ffn_dim=64, dec_ffn_dim=64, rpe_hidden_dim=32,
                     num_queries_one2many=20, topk=10)
    head = cls([32] * n, [16] * n, num_classes=5, **small)
    for train in (True, False):
        head.train(train)
        out = fake_call(head, lambda: (vit_features(n, side=8), (128, 128)),
                        None if train else lambda m, out: m.predict(out, (128, 128)))
        boxes = out["pred_boxes"] if train else out[0]["boxes"]
        assert boxes.device.type == "cuda"


@pytest.mark.parametrize("name", DECODERS)
def test_smp_heads(name):
    head = SMPHead([32] * 4, [16] * 4, 5, name).train()
    scores = fake_call(head, lambda: (vit_features(), (64, 64)), lambda m, out: m.predict(out, (64, 64)))
    assert scores.device.type == "cuda"
