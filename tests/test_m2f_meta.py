"""ViT-Adapter + Mask2Former against Meta's DINOv3 segmentor, and the converter of Meta's released segmentor file.

Fixtures: ``tools/meta_fixtures/m2f_adapter.py`` ran Meta's ``DINOv3_Adapter`` + ``Mask2FormerHead`` on a tiny
seeded ViT (our ``vit_test`` shape) and saved the manifests of the segmentor (Meta's released format) and of the
backbone (Meta's layout), the inputs and Meta's outputs. The tests rebuild both files from the manifests and save
them as Meta does (flat state dicts in ``.pth`` files) before reading them through our loaders.
"""

from pathlib import Path

import pytest
import torch

from backbones import build_backbone
from backbones.features import Features
from backbones.registry import get_spec
from heads.mask2former import Mask2FormerHead, ViTAdapter
from heads.mask2former.meta_checkpoint import META_SEGMENTOR
from heads.ops import MSDeformAttn
from tasks import SegmentationTask, load_predictor
from tasks.loading import _load_head_tensors, build_head
from tasks.meta_heads import read_meta_file
from tasks.predictor import ExportError
from reference_arrays import load_arrays  # noqa: E402
from seeded_weights import write_meta_file

FIXTURES = Path(__file__).parent / "fixtures" / "meta" / "m2f_adapter"
TOL = 1e-4


@pytest.fixture(scope="module")
def segmentor_file(tmp_path_factory):
    return write_meta_file(FIXTURES / "segmentor.manifest.json", tmp_path_factory.mktemp("meta_m2f"))


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    return write_meta_file(FIXTURES / "backbone.manifest.json", tmp_path_factory.mktemp("meta_m2f"))


@pytest.fixture(scope="module")
def io():
    return load_arrays(FIXTURES / "io.npz")


@pytest.fixture(scope="module")
def converted(segmentor_file):
    return META_SEGMENTOR.convert(read_meta_file(segmentor_file), get_spec("vit_test"), str(segmentor_file))


@pytest.fixture(scope="module")
def model(converted, segmentor_file, backbone_file):
    backbone = build_backbone("vit_test", weights=str(backbone_file))
    head = build_head(converted.head, backbone.channels, backbone.strides, converted.num_classes)
    _load_head_tensors(head, converted.state, str(segmentor_file))
    return backbone.eval(), head.eval()


def test_converter_reads_sizes_from_shapes(converted, segmentor_file):
    assert META_SEGMENTOR.matches(read_meta_file(segmentor_file))
    head = converted.head
    assert (head["hidden_dim"], head["dim_feedforward"], head["num_queries"]) == (64, 128, 20)
    assert (head["enc_layers"], head["dec_layers"], head["num_heads"], head["deform_points"]) == (2, 4, 16, 4)
    assert (head["neck"], head["pixel_decoder_layout"]) == ("adapter", "meta")
    assert head["adapter"] == {"conv_inplanes": 16, "num_heads": 16, "num_points": 4, "value_ratio": 0.5,
                               "ffn_ratio": 0.25, "extra_extractors": 2}
    assert converted.num_classes == 19 and converted.out_indices == [0, 1, 2, 3]


def test_adapter_and_mask2former_match_meta(model, io):
    backbone, head = model
    with torch.no_grad():
        features = backbone(io["images"])
        levels = head.neck_levels(features)
        outputs = head(features, features.padded_size)
        probs = head.predict(outputs, features.padded_size)
    for i, level in enumerate(levels, 1):
        torch.testing.assert_close(level, io[f"level{i}"], atol=TOL, rtol=0)
    torch.testing.assert_close(outputs["pred_logits"], io["pred_logits"], atol=TOL, rtol=0)
    torch.testing.assert_close(outputs["pred_masks"], io["pred_masks"], atol=TOL, rtol=0)
    torch.testing.assert_close(probs[0], io["probs"], atol=TOL, rtol=0)


def test_load_predictor_on_meta_segmentor(io, segmentor_file, backbone_file):
    predictor = load_predictor(segmentor_file, backbone="vit_test", backbone_weights=str(backbone_file))
    assert predictor.kind == "segmentation" and predictor.num_classes == 19
    assert predictor.eval_settings["crop"] == 896 and predictor.eval_settings["stride"] == 596
    with torch.no_grad():
        scores = predictor.model(io["images"][:1])
    torch.testing.assert_close(scores[0], io["probs"], atol=TOL, rtol=0)
    result = predictor.predict(torch.rand(3, 40, 56), mode="whole")
    assert result["probs"].shape == (19, 40, 56) and result["labels"].shape == (40, 56)


def test_head_weights_initialise_training_from_meta_file(converted, io, segmentor_file, backbone_file):
    head_cfg = dict(converted.head, weights=str(segmentor_file))
    task = SegmentationTask(backbone={"name": "vit_test", "weights": str(backbone_file)}, head=head_cfg, num_classes=19)
    for key, value in converted.state.items():
        assert torch.equal(task.head.state_dict()[key], value), key
    task.eval()
    with torch.no_grad():
        outputs = task(io["images"])
    torch.testing.assert_close(outputs["pred_logits"], io["pred_logits"], atol=TOL, rtol=0)


def _save(state, path):
    torch.save(state, path)
    return path


def test_bad_segmentor_files_are_refused_with_clear_errors(tmp_path, converted, segmentor_file):
    state = read_meta_file(segmentor_file)
    # a file of another kind: no format matches
    other = _save({"decoder.weight": torch.zeros(3, 4), "decoder.bias": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(ExportError, match="foreign.pth.*match none"):
        load_predictor(other, backbone="vit_test")
    # unknown keys inside a segmentor
    odd = _save(dict(state, **{"segmentation_model.1.predictor.extra.weight": torch.zeros(1)}), tmp_path / "odd.pth")
    with pytest.raises(ExportError, match=r"odd.pth: keys \['segmentation_model.1.predictor.extra.weight'\]"):
        load_predictor(odd, backbone="vit_test")
    # the adapter missing (a head-only M2F)
    no_adapter = _save({k: v for k, v in state.items() if k.startswith("segmentation_model.1.")}, tmp_path / "head.pth")
    with pytest.raises(ExportError, match="head.pth: incomplete M2F segmentor"):
        load_predictor(no_adapter, backbone="vit_test")
    # backbone weights inside
    full = _save(dict(state, **{"segmentation_model.0.backbone.cls_token": torch.zeros(1, 1, 64)}), tmp_path / "full.pth")
    with pytest.raises(ExportError, match="full.pth: holds backbone weights"):
        load_predictor(full, backbone="vit_test")
    # a backbone of another width, or not a ViT
    with pytest.raises(ExportError, match="segmentor.pth .*size mismatch for adapter.level_embed"):
        load_predictor(segmentor_file, backbone="vits16")
    with pytest.raises(ExportError, match="reads a ViT through its adapter"):
        load_predictor(segmentor_file, backbone="convnext_test")
    # head.weights on a head of other sizes
    head_cfg = dict(converted.head, hidden_dim=32, weights=str(segmentor_file))
    with pytest.raises(ExportError, match="does not fit the head"):
        SegmentationTask(backbone={"name": "vit_test"}, head=head_cfg, num_classes=19)


TINY = dict(hidden_dim=32, num_queries=8, dec_layers=2, enc_layers=1, num_heads=4, num_points=256)


def test_gradients_flow_through_the_adapter():
    torch.manual_seed(0)
    backbone = build_backbone("vit_test")
    head = Mask2FormerHead(backbone.channels, backbone.strides, 5, neck="adapter", pixel_decoder_layout="meta",
                           adapter={"drop_path_rate": 0.0, "conv_inplanes": 8}, **TINY).train()
    features = backbone(torch.randn(2, 3, 64, 64))
    mask = torch.randint(0, 5, (2, 64, 64))
    losses = head.loss(head(features, features.padded_size), {"mask": mask})
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in head.adapter.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for part in ("spatial_prior.stem.0.weight", "blocks.0.0.attn.sampling_offsets.weight", "blocks.3.2.ffn.fc1.weight",
                 "blocks.1.0.attn.value_proj.weight", "up.weight", "level_embed"):
        assert grads[part].abs().sum() > 0, part


@pytest.mark.parametrize("neck,layout", [("adapter", "projected"), ("pyramid", "meta"), ("adapter", "meta")])
def test_neck_and_layout_options_on_sizes_not_multiple_of_32(neck, layout):
    backbone = build_backbone("vit_test")
    adapter = {"conv_inplanes": 8} if neck == "adapter" else None
    head = Mask2FormerHead(backbone.channels, backbone.strides, 3, neck=neck, pixel_decoder_layout=layout,
                           adapter=adapter, **TINY).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 48, 80))
        levels = head.neck_levels(features)
        scores = head.predict(head(features, features.padded_size), features.padded_size)
    assert [tuple(level.shape[-2:]) for level in levels] == [(12, 20), (6, 10), (3, 5), (2, 3)]
    assert scores.shape == (1, 3, 48, 80)


def test_adapter_needs_images_and_a_vit():
    backbone = build_backbone("vit_test")
    head = Mask2FormerHead(backbone.channels, backbone.strides, 3, neck="adapter", adapter={"conv_inplanes": 8}, **TINY)
    features = backbone(torch.randn(1, 3, 32, 32))
    bare = Features(maps=features.maps, cls=None, strides=features.strides, channels=features.channels, patch_size=16)
    with pytest.raises(ValueError, match="Features.images is None"):
        head(bare, (32, 32))
    with pytest.raises(ValueError, match="needs a ViT"):
        Mask2FormerHead([16, 32, 64, 128], [4, 8, 16, 32], 3, neck="adapter", **TINY)
    with pytest.raises(ValueError, match="neck must be"):
        Mask2FormerHead(backbone.channels, backbone.strides, 3, neck="fpn", **TINY)


def test_msdeform_attn_value_ratio_and_adapter_checkpointing_give_same_numbers():
    attn = MSDeformAttn(64, 16, num_levels=1, num_points=4, value_ratio=0.5)
    assert attn.value_proj.weight.shape == (32, 64) and attn.output_proj.weight.shape == (64, 32)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MSDeformAttn(64, 16, num_levels=1, value_ratio=0.1)
    torch.manual_seed(0)
    adapter = ViTAdapter(64, conv_inplanes=8, drop_path_rate=0.0).train()
    images, maps = torch.randn(1, 3, 64, 64), [torch.randn(1, 64, 4, 4) for _ in range(4)]
    plain = sum(level.square().sum() for level in adapter(images, maps))
    plain.backward()
    grads = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    adapter.grad_checkpointing = True
    checkpointed = sum(level.square().sum() for level in adapter(images, maps))
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    for a, p in zip(grads, adapter.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_train_py_runs_with_the_adapter_head(tmp_path, train_cli):
    run_dir = tmp_path / "run"
    result = train_cli(
        "task=demo_m2f", "head=m2f_adapter", "backbone=vit_test", "head.hidden_dim=32", "head.num_queries=8",
        "head.dec_layers=2", "head.enc_layers=1", "head.num_heads=4", "head.num_points=256",
        "head.adapter.conv_inplanes=8", "data.train.num_images=4", "data.val.num_images=2", "data.train.size=[64,64]",
        "data.val.size=[64,64]", "data.crop_size=64", "data.base_size=64", "data.batch_size=2", "data.num_workers=0",
        "trainer.max_steps=3", "trainer.val_check_interval=3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("fp32", [True, False])
def test_fp32_pixel_decoder_under_autocast(fp32):
    backbone = build_backbone("vit_test")
    head = Mask2FormerHead(backbone.channels, backbone.strides, 3, neck="adapter", pixel_decoder_layout="meta",
                           adapter={"conv_inplanes": 8}, fp32_pixel_decoder=fp32, **TINY).eval()
    seen = []
    head.pixel_decoder.register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
    features = backbone(torch.randn(1, 3, 64, 64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = head(features, features.padded_size)
    assert seen == [torch.float32 if fp32 else torch.bfloat16]
    assert torch.isfinite(outputs["pred_masks"].float()).all()
