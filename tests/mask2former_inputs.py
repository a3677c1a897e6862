"""Tiny inputs shared by the Mask2Former tests: backbone features, label maps, the sizes of a small head, and one
intra-op thread (an autouse fixture: each test file imports it)."""

import math

import pytest
import torch
import torch.nn.functional as F

from backbones.features import Features


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and spin badly on a shared CPU). Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(hidden_dim=32, num_queries=6, dec_layers=2, enc_layers=1, num_heads=4, num_points=256)


def vit_features(b=2, c=64, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, c, h, w, generator=g) for _ in range(4)]
    return Features(maps=maps, cls=None, strides=[16] * 4, channels=[c] * 4, patch_size=16, padded_size=(16 * h, 16 * w))


def blocky_masks(b, h, w, num_classes, seed=0, block=16):
    """Piecewise-constant label maps (B, H, W)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (b, 1, math.ceil(h / block), math.ceil(w / block)), generator=g)
    return F.interpolate(coarse.float(), scale_factor=block, mode="nearest")[:, 0, :h, :w].long()
