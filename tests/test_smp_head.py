"""heads/smp: each decoder equals the same decoder inside an smp model; ViT / ConvNeXt features; export + ONNX."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from backbones import build_backbone  # noqa: E402
from backbones.features import Features  # noqa: E402
from heads.ops import SimpleFeaturePyramid  # noqa: E402
from heads.smp import DECODERS, SMPHead  # noqa: E402
from heads.smp.pooling import BinAdaptiveAvgPool2d  # noqa: E402

# decoder -> (smp model class, its arguments (small widths, random encoder), the same widths as our decoder_args)
SMP_MODELS = {
    "fpn": (smp.FPN, dict(encoder_name="resnet18", decoder_pyramid_channels=32, decoder_segmentation_channels=32),
            dict(pyramid_channels=32, segmentation_channels=32)),
    "upernet": (smp.UPerNet, dict(encoder_name="resnet18", decoder_channels=32), dict(decoder_channels=32)),
    "segformer": (smp.Segformer, dict(encoder_name="mit_b0", decoder_segmentation_channels=32),
                  dict(segmentation_channels=32)),
    "deeplabv3plus": (smp.DeepLabV3Plus, dict(encoder_name="resnet18", decoder_channels=32), dict(out_channels=32)),
    "dpt": (smp.DPT, dict(encoder_name="tu-vit_tiny_patch16_224", decoder_intermediate_channels=(16, 32, 64, 64),
                          decoder_fusion_channels=32, dynamic_img_size=True),
            dict(intermediate_channels=(16, 32, 64, 64), fusion_channels=32)),
}
SMALL = {"fpn": dict(pyramid_channels=32, segmentation_channels=32), "upernet": dict(decoder_channels=16),
         "segformer": dict(segmentation_channels=16), "deeplabv3plus": dict(out_channels=16, atrous_rates=(2, 4, 6)),
         "dpt": dict(intermediate_channels=(16, 16, 32, 32), fusion_channels=16)}


def _randomise_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def test_every_decoder_has_a_parity_case():
    assert set(DECODERS) == set(SMP_MODELS) == set(SMALL)


@pytest.mark.parametrize("name", list(SMP_MODELS))
def test_decoder_equals_the_smp_model_decoder_on_its_encoder_features(name):
    """smp model(x) == our head(encoder(x)) with the model's decoder + segmentation-head weights loaded strictly."""
    cls, model_args, decoder_args = SMP_MODELS[name]
    torch.manual_seed(0)
    model = cls(encoder_weights=None, classes=5, **model_args)
    _randomise_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        if name == "dpt":
            maps, prefix = model.encoder(x)
            strides, cls_tokens = [16] * len(maps), [p[:, 0] for p in prefix]
        else:  # resnet18 / mit_b0: [image, stride 2, 4, 8, 16, 32]; DeepLabV3+ dilates the last stage to stride 16
            maps, cls_tokens = model.encoder(x)[2:], None
            strides = [4, 8, 16, 16 if name == "deeplabv3plus" else 32]
    channels = [m.shape[1] for m in maps]
    head = SMPHead(channels, strides, 5, name, decoder_args=decoder_args)
    assert head.pyramid is None  # the decoder reads these strides directly
    head.load_state_dict({k: v for k, v in model.state_dict().items()
                          if k.startswith(("decoder.", "segmentation_head."))}, strict=True)
    head.eval()
    features = Features(maps=list(maps), cls=cls_tokens, strides=strides, channels=channels, patch_size=16,
                        padded_size=(64, 96))
    with torch.no_grad():
        ours = head(features, (64, 96))
    assert ours.shape == expected.shape == (2, 5, 64, 96)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", ["vit_test", "convnext_test"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_vit_and_convnext_features_give_logits_at_input_size_with_gradients(backbone, name):
    torch.manual_seed(0)
    net = build_backbone(backbone).eval()
    with torch.no_grad():
        features = net(torch.randn(2, 3, 80, 112))  # a 5 x 7 ViT grid: odd, padded for FPN / DPT
    head = SMPHead(list(net.channels), list(net.strides), 4, name, decoder_args=SMALL[name], pyramid_channels=16)
    vit = backbone == "vit_test"
    assert (head.pyramid is not None) == (vit and name != "dpt" or name == "deeplabv3plus")
    outputs = head(features, features.padded_size)
    assert outputs.shape == (2, 4, *features.padded_size)
    mask = torch.randint(0, 4, (2, *features.padded_size))
    mask[:, :8] = 255
    losses = head.loss(outputs, {"mask": mask})
    sum(losses.values()).backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert head.predict(outputs, (70, 100)).shape == (2, 4, 70, 100)


def test_pyramid_strides_and_the_moved_module():
    from heads.mask2former import SimpleFeaturePyramid as m2f_pyramid

    assert m2f_pyramid is SimpleFeaturePyramid
    pyramid = SimpleFeaturePyramid([8] * 4, [16] * 4, 8, out_strides=(4, 8, 16, 16))
    levels = pyramid([torch.randn(1, 8, 4, 6) for _ in range(4)])
    assert [tuple(level.shape[-2:]) for level in levels] == [(16, 24), (8, 12), (4, 6), (4, 6)]


def test_adaptive_pooling_swap_equals_pytorch():
    for size in ((5, 7), (2, 2), (13, 4)):
        x = torch.randn(2, 3, *size)
        for bins in (1, 2, 3, 6):
            torch.testing.assert_close(BinAdaptiveAvgPool2d(bins)(x), F.adaptive_avg_pool2d(x, bins), atol=1e-6, rtol=0)
    head = SMPHead([8] * 4, [16] * 4, 3, "upernet", decoder_args={"decoder_channels": 8}, pyramid_channels=8)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size != 1 for m in head.modules())


def test_bad_decoder_config_names_the_value():
    with pytest.raises(ValueError, match="head.decoder='unet'"):
        SMPHead([8] * 4, [16] * 4, 3, "unet")
    with pytest.raises(ValueError, match=r"decoder_args \['channels'\]"):
        SMPHead([8] * 4, [16] * 4, 3, "upernet", decoder_args={"channels": 8})
    with pytest.raises(ValueError, match="intermediate_channels"):
        SMPHead([8] * 3, [16] * 3, 3, "dpt")
    head = SMPHead([8] * 4, [16] * 4, 3, "dpt", decoder_args=SMALL["dpt"])
    with pytest.raises(ValueError, match="class tokens"):
        head(Features([torch.randn(1, 8, 2, 2)] * 4, None, [16] * 4, [8] * 4, 16, (32, 32)), (32, 32))


_SLOW = not os.environ.get("DINOV3_SLOW_TESTS")


@pytest.mark.parametrize("name", [n if n == "upernet" else pytest.param(
    n, marks=pytest.mark.skipif(_SLOW, reason="set DINOV3_SLOW_TESTS=1 (an ONNX export per decoder)")) for n in DECODERS])
def test_export_and_onnx_with_other_batch_and_size(tmp_path, name):
    """Head-only safetensors + config rebuild through load_predictor; ONNX with dynamic batch / size via onnxruntime."""
    import onnxruntime as ort

    from tasks import SegmentationTask, load_predictor
    from tasks.export import export_checkpoint

    torch.manual_seed(0)
    head = {"_target_": "heads.smp.SMPHead", "decoder": name, "decoder_args": SMALL[name], "pyramid_channels": 16}
    task = SegmentationTask(backbone={"name": "vit_test", "weights": None}, head=head, num_classes=4,
                            class_names=list("abcd"))
    _randomise_batchnorm(task.head)
    task.eval()
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "a.ckpt")
    report = export_checkpoint(tmp_path / "a.ckpt", tmp_path / "export", onnx=True)
    assert report["verify_diff"] == 0.0 and report["onnx_diff"] < 1e-3
    assert {p.name for p in Path(tmp_path / "export").iterdir()} >= {"config.yaml", "head.safetensors", "model.onnx"}
    predictor = load_predictor(tmp_path / "export")
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 32, 80), (3, 3, 96, 48)):  # the export example is (2, 3, 64, 96)
        x = torch.randn(*shape)
        (dense,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            reference = predictor.model(x)
            assert torch.allclose(reference, task.dense(x), atol=1e-5)
        assert dense.shape == reference.shape == (shape[0], 4, *shape[2:])
        assert np.abs(dense - reference.numpy()).max() < 1e-3
