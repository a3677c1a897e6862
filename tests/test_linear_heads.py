import pytest
import torch
import torch.nn.functional as F

from backbones import build_backbone
from backbones.features import Features
from heads import LinearClassifier, LinearSegHead


def _vit_features(batch=2, channels=16, grid=(4, 6), layers=2) -> Features:
    maps = [torch.randn(batch, channels, *grid) for _ in range(layers)]
    cls = [torch.randn(batch, channels) for _ in range(layers)]
    return Features(maps, cls, [16] * layers, [channels] * layers, 16, (grid[0] * 16, grid[1] * 16))


def test_linear_seg_head_matches_hand_computation():
    features = _vit_features()
    head = LinearSegHead([16, 16], [16, 16], num_classes=5).eval()
    with torch.no_grad():
        head.batchnorm.running_mean.uniform_(-1, 1)
        head.batchnorm.running_var.uniform_(0.5, 2)
        logits = head(features, (64, 96))
    x = torch.cat(features.maps, 1)
    bn = head.batchnorm
    normed = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    normed = normed * bn.weight[:, None, None] + bn.bias[:, None, None]
    expected = torch.einsum("kc,bchw->bkhw", head.conv.weight[:, :, 0, 0], normed) + head.conv.bias[:, None, None]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert head.predict(logits, (64, 96)).shape == (2, 5, 64, 96)


def test_linear_seg_loss_ignores_255_and_handles_all_ignored():
    head = LinearSegHead([16, 16], [16, 16], num_classes=5)
    logits = torch.randn(2, 5, 4, 6, requires_grad=True)
    mask = torch.randint(0, 5, (2, 64, 96))
    mask[:, :10] = 255
    loss = head.loss(logits, {"mask": mask})["loss_ce"]
    up = F.interpolate(logits, (64, 96), mode="bilinear", align_corners=False)
    keep = mask != 255
    expected = -torch.log_softmax(up, 1).gather(1, mask.clamp(max=4)[:, None])[:, 0][keep].mean()
    torch.testing.assert_close(loss, expected)
    empty = head.loss(logits, {"mask": torch.full((2, 64, 96), 255)})["loss_ce"]
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


def test_linear_classifier_reads_cls_and_mean_patch_tokens():
    features = _vit_features(layers=3)
    head = LinearClassifier([16] * 3, [16] * 3, num_classes=4, n_last_blocks=2)
    assert head.linear.in_features == 16 * 3
    logits = head(features, (64, 96))
    inputs = torch.cat([features.cls[1], features.cls[2], features.maps[2].mean((2, 3))], 1)
    torch.testing.assert_close(logits, head.linear(inputs))
    with pytest.raises(ValueError, match="use_cls=False"):
        head(Features(features.maps, None, [4, 8, 16], [16] * 3, 4, (64, 96)), (64, 96))
    convnext = LinearClassifier([8, 16], [16, 32], num_classes=4, use_cls=False)
    assert convnext(Features([torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)], None, [16, 32], [8, 16], 4,
                             (64, 64)), (64, 64)).shape == (2, 4)


def test_linear_seg_head_learns_on_a_frozen_backbone():
    """A few hundred steps on colour-coded images: the probe must separate the classes."""
    torch.manual_seed(0)
    backbone = build_backbone("vit_test")
    colours = torch.tensor([[-1.5, 0.0, 1.5], [1.5, -1.5, 0.0], [0.0, 1.5, -1.5]])
    mask = torch.randint(0, 3, (4, 4, 4)).repeat_interleave(16, 1).repeat_interleave(16, 2)
    images = colours[mask].permute(0, 3, 1, 2) + 0.1 * torch.randn(4, 3, 64, 64)
    head = LinearSegHead(backbone.channels, backbone.strides, num_classes=3)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    with torch.no_grad():
        features = backbone(images)
    for _ in range(150):
        loss = head.loss(head(features, (64, 64)), {"mask": mask})["loss_ce"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    accuracy = (head.predict(head(features, (64, 64)), (64, 64)).argmax(1) == mask).float().mean()
    assert loss.item() < 0.3 and accuracy > 0.9
