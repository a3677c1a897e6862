import time

import pytest
import torch
from safetensors.torch import save_file

from backbones import BACKBONES, WeightsError, build_backbone
from backbones.weights import resolve_weights
from backbones.registry import get_spec


@pytest.mark.parametrize("name", ["vit_test", "convnext_test"])
def test_features_shapes_and_padding(name):
    backbone = build_backbone(name)
    features = backbone(torch.randn(2, 3, 70, 90))
    multiple = 16 if name == "vit_test" else 32
    height, width = features.padded_size
    assert (height, width) == (-(-70 // multiple) * multiple, -(-90 // multiple) * multiple)
    assert len(features.maps) == 4
    for fmap, stride, channels in zip(features.maps, features.strides, features.channels):
        assert fmap.shape == (2, channels, height // stride, width // stride)
    if name == "vit_test":
        assert features.strides == [16] * 4 and [c.shape for c in features.cls] == [(2, 64)] * 4
    else:
        assert features.strides == [4, 8, 16, 32] and features.cls is None


def test_padding_never_crops():
    """The bottom-right pixels still influence the features (the input was padded, not cropped)."""
    backbone = build_backbone("vit_test")
    image = torch.randn(1, 3, 40, 40)
    changed = image.clone()
    changed[..., -1, -1] += 10
    with torch.no_grad():
        a, b = backbone(image).maps[-1], backbone(changed).maps[-1]
    assert not torch.allclose(a[..., -1, -1], b[..., -1, -1])


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*vits16.*convnext_large"):
        build_backbone("vit_gigantic")


def test_out_indices_negative_and_out_of_range():
    assert build_backbone("vit_test", out_indices=[-1]).out_indices == [3]
    with pytest.raises(ValueError, match=r"out of range for vit_test with 4 blocks"):
        build_backbone("vit_test", out_indices=[4])


def test_every_named_backbone_has_a_config_and_sane_indices():
    from pathlib import Path
    conf = Path(__file__).resolve().parents[1] / "conf" / "backbone"
    for name, spec in BACKBONES.items():
        assert (conf / f"{name}.yaml").exists(), name
        assert all(0 <= i < spec.depth for i in spec.out_indices)
    assert BACKBONES["vitl16"].out_indices == (4, 11, 17, 23)
    assert BACKBONES["vit7b16"].out_indices == (9, 19, 29, 39)


def _hf_model(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
                             num_register_tokens=4)
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "hf")
    return model


def test_hf_format_matches_transformers(tmp_path):
    """Weights saved by transformers' DINOv3ViTModel give the same features as transformers itself."""
    reference = _hf_model(tmp_path)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
    for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        backbone = build_backbone("vit_test", weights=str(source), out_indices=[3])
        with torch.no_grad():
            features = backbone(images)
        patches = features.maps[0].flatten(2).transpose(1, 2)
        torch.testing.assert_close(patches, expected[:, 5:], atol=1e-4, rtol=0)
        torch.testing.assert_close(features.cls[0], expected[:, 0], atol=1e-4, rtol=0)


def _meta_state_dict(model) -> dict:
    """Re-express a timm DINOv3 state dict in Meta's key layout, as in Meta's released .pth files."""
    state = model.state_dict()
    dim = state["cls_token"].shape[-1]
    meta = {"cls_token": state["cls_token"], "storage_tokens": state["reg_token"],
            "mask_token": torch.zeros(1, dim), "rope_embed.periods": torch.ones(dim // 8),
            "patch_embed.proj.weight": state["patch_embed.proj.weight"],
            "patch_embed.proj.bias": state["patch_embed.proj.bias"],
            "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        meta[b + "attn.qkv.weight"] = state[b + "attn.qkv.weight"]
        meta[b + "attn.qkv.bias"] = torch.cat([state[b + "attn.q_bias"], torch.zeros(dim), state[b + "attn.v_bias"]])
        meta[b + "attn.qkv.bias_mask"] = torch.ones(3 * dim)
        meta[b + "ls1.gamma"] = state[b + "gamma_1"]
        meta[b + "ls2.gamma"] = state[b + "gamma_2"]
        for key in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                meta[b + f"{key}.{kind}"] = state[b + f"{key}.{kind}"]
    return meta


def test_meta_and_timm_formats_load_exactly(tmp_path):
    torch.manual_seed(1)
    source = build_backbone("vit_test")
    with torch.no_grad():
        for param in source.parameters():
            param.normal_(0, 0.2)
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected = source(images).maps
    torch.save({"teacher": {f"backbone.{k}": v for k, v in _meta_state_dict(source.model).items()}},
               tmp_path / "meta_teacher.pth")
    torch.save(_meta_state_dict(source.model), tmp_path / "meta.pth")
    save_file(source.model.state_dict(), tmp_path / "timm.safetensors")
    for name in ("meta.pth", "meta_teacher.pth", "timm.safetensors"):
        loaded = build_backbone("vit_test", weights=str(tmp_path / name))
        with torch.no_grad():
            got = loaded(images).maps
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_checkpoint_for_another_architecture_names_keys(tmp_path):
    other = build_backbone("convnext_test")
    save_file(other.model.state_dict(), tmp_path / "convnext.safetensors")
    with pytest.raises(WeightsError, match=r"do not fit this backbone.*missing keys: .*blocks\.0"):
        build_backbone("vit_test", weights=str(tmp_path / "convnext.safetensors"))
    wider = build_backbone("vit_test").model.state_dict()
    wider["cls_token"] = torch.zeros(1, 1, 32)
    save_file(wider, tmp_path / "narrow.safetensors")
    with pytest.raises(WeightsError, match=r"shape mismatch: cls_token: checkpoint \(1, 1, 32\) vs model \(1, 1, 64\)"):
        build_backbone("vit_test", weights=str(tmp_path / "narrow.safetensors"))


def test_missing_or_corrupt_local_file(tmp_path):
    with pytest.raises(WeightsError, match="not found: .*nope.pth"):
        build_backbone("vit_test", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights from .*bad.pth"):
        build_backbone("vit_test", weights=str(tmp_path / "bad.pth"))


@pytest.mark.parametrize("offline", ["1", "0"])
def test_unreachable_hub_weights_fail_fast_with_remedy(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens: unreachable even with a network
    start = time.monotonic()
    with pytest.raises(WeightsError, match="pass the local path|weights=PATH"):
        resolve_weights("hf", get_spec("vitl16"))
    with pytest.raises(WeightsError, match="weights=PATH"):
        resolve_weights("timm", get_spec("vits16"))
    assert time.monotonic() - start < 5.0


def test_frozen_backbone_stays_in_eval_without_grads():
    backbone = build_backbone("vit_test", freeze="frozen")
    wrapper = torch.nn.Sequential(backbone)
    wrapper.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    features = backbone(torch.randn(1, 3, 32, 32, requires_grad=True))
    assert not features.maps[0].requires_grad


def test_last_n_trains_only_the_last_blocks():
    backbone = build_backbone("vit_test", freeze="last_n", last_n=1)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.blocks.3.", "model.norm.")) for n in trainable)
    assert any(n.startswith("model.blocks.3.") for n in trainable)
    backbone.train()
    assert backbone.training
    with pytest.raises(ValueError, match="last_n"):
        build_backbone("vit_test", freeze="last_n", last_n=0)


def test_lora_starts_as_identity_and_trains_only_adapters():
    torch.manual_seed(0)
    plain = build_backbone("vit_test")
    adapted = build_backbone("vit_test", freeze="lora", lora_rank=4)
    adapted.model.load_state_dict(plain.model.state_dict(), strict=False)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapted(images).maps[-1], plain(images).maps[-1])
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 4  # A and B for qkv and proj in 4 blocks
    output = adapted(images).maps[-1]
    (output * torch.randn_like(output)).sum().backward()  # a plain sum of LayerNorm outputs has no gradient
    lora_a = adapted.model.blocks[0].attn.qkv.parametrizations.weight[0].lora_A
    lora_b = adapted.model.blocks[0].attn.qkv.parametrizations.weight[0].lora_B
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0  # B = 0 at start, so only B moves first
    assert lora_a.grad is not None
    with pytest.raises(ValueError, match="lora"):
        build_backbone("convnext_test", freeze="lora")


def test_every_pretrained_tag_is_known_to_timm():
    """``weights=timm`` must name real timm weights for every full-size backbone (checked offline)."""
    from timm.models import get_pretrained_cfg
    for name, spec in BACKBONES.items():
        if spec.timm_tag is None:
            continue
        cfg = get_pretrained_cfg(f"{spec.arch}.{spec.timm_tag}")
        assert cfg is not None and cfg.hf_hub_id, name
        assert spec.hf_id.startswith("facebook/dinov3-") and spec.hf_id.endswith("-pretrain-lvd1689m")
