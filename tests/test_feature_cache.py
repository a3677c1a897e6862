"""Frozen-feature cache: cached values equal a fresh forward, keys invalidate, bad files are rebuilt, DDP shards."""

import json
import re

import numpy as np
import pytest
import torch

from backbones import build_backbone
from dense_data.feature_cache import CacheError, CachedFeatures, FeatureCache, SeededViews, collate_cached
from dense_data.synthetic import SyntheticScenes
from dense_data.transforms import train_transform


def _cache(root, backbone=None, targets=("mask",), views=2, pool=False, crop=32, num_images=6):
    torch.manual_seed(0)
    backbone = backbone or build_backbone("vit_test")
    dataset = SyntheticScenes(num_images=num_images, size=(48, 48))
    pipeline = train_transform(tuple(targets), crop, crop, (0.75, 1.5), True, True)
    return FeatureCache(root, "vit_test", backbone, dataset, pipeline, targets, views=views, pool=pool,
                        num_classes=6)


def _assert_fresh(cache: FeatureCache, cached: CachedFeatures, samples, pool=False):
    source = SeededViews(cache.source.transformed.dataset, cache.source.transformed.transform, cache.targets,
                         cache.views, 0)
    for s in samples:
        fresh_item, item = source[s], cached[s]
        with torch.no_grad():
            fresh = cache.backbone(fresh_item["image"][None])
        for got, want in zip(item["features"]["maps"], fresh.maps):
            want = want[0].mean(dim=(1, 2), keepdim=True) if pool else want[0]
            torch.testing.assert_close(got.float(), want, atol=1e-3, rtol=1e-3)
        for got, want in zip(item["features"]["cls"], fresh.cls):
            torch.testing.assert_close(got.float(), want[0], atol=1e-3, rtol=1e-3)
        for key in cache.targets:
            assert torch.equal(item[key], fresh_item[key])
        assert item["meta"]["padded_size"] == fresh.padded_size


def test_cached_features_equal_a_fresh_forward_and_views_are_fixed(tmp_path):
    cache = _cache(tmp_path)
    cached = cache.prepare()
    assert len(cached) == 12
    _assert_fresh(cache, cached, range(12))
    # Two views of one image differ (augmented); each view is the same every time it is made.
    assert not torch.equal(cached[0]["features"]["maps"][0], cached[1]["features"]["maps"][0])
    source = cache.source
    assert torch.equal(source[3]["image"], source[3]["image"])
    batch = collate_cached([cached[0], cached[1]])
    assert batch["features"]["maps"][0].shape == (2, 64, 2, 2) and batch["mask"].shape == (2, 32, 32)
    # Prepared again: nothing to compute, the same folder.
    assert cache.prepare().folder == cached.folder


def test_pooled_classification_cache(tmp_path):
    cache = _cache(tmp_path, targets=("label",), views=1, pool=True)
    cached = cache.prepare()
    _assert_fresh(cache, cached, range(6), pool=True)
    assert cached[0]["features"]["maps"][0].shape == (64, 1, 1)


def test_changed_backbone_layers_pipeline_or_weights_is_another_folder(tmp_path):
    base = _cache(tmp_path).folder
    torch.manual_seed(0)
    assert _cache(tmp_path, backbone=build_backbone("vit_test", out_indices=[-1])).folder != base
    assert _cache(tmp_path, crop=48).folder != base
    assert _cache(tmp_path, views=3).folder != base
    assert _cache(tmp_path, num_images=7).folder != base
    torch.manual_seed(1)
    assert _cache(tmp_path, backbone=build_backbone("vit_test")).folder != base  # other weights


def test_truncated_foreign_and_corrupt_files_are_rebuilt(tmp_path, capfd):
    cache = _cache(tmp_path)
    cached = cache.prepare()
    shard = cached.shards[0].path
    reference = cached[5]["features"]["maps"][3].clone()

    # Truncated: the size check catches it and the shard is rebuilt.
    shard.write_bytes(shard.read_bytes()[:-100])
    cached = cache.prepare()
    assert "truncated" in capfd.readouterr().err
    torch.testing.assert_close(cached[5]["features"]["maps"][3], reference)

    # A flipped byte inside a record: reading it fails loudly, preparing again recomputes it.
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        CachedFeatures(cached.folder, cached.shards, len(cached), 2, "float16", False)[11]
    cached = cache.prepare()
    assert "does not match its checksum; recomputing" in capfd.readouterr().err
    _assert_fresh(cache, cached, [11])

    # A shard of another key copied in: its header names the other key, so it is rebuilt.
    other = _cache(tmp_path / "other", views=2)
    other.key["seed"] = 1  # same layout, another key
    other.hash = "0" * 64
    other.folder = tmp_path / "other" / "x"
    foreign = other.prepare().shards[0].path
    shard.write_bytes(foreign.read_bytes())
    cached = cache.prepare()
    assert "header of another cache key" in capfd.readouterr().err
    _assert_fresh(cache, cached, [0, 4])

    # A folder whose key.json is another key's is reset.
    (cached.folder / "key.json").write_text(json.dumps({"backbone": "other"}))
    cache.prepare()
    assert "holds another key" in capfd.readouterr().err


def test_cache_refuses_a_trainable_backbone(tmp_path):
    with pytest.raises(ValueError, match="frozen backbone"):
        _cache(tmp_path, backbone=build_backbone("vit_test", freeze="all"))


def test_train_py_ddp_builds_one_shard_per_rank_and_one_process_reuses_them(tmp_path, train_cli, capfd):
    common = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.train.num_images=12",
              "data.val.num_images=2", "data.batch_size=2", "data.num_workers=0", "data.crop_size=32",
              "data.base_size=32", "data.cache.enabled=true", "data.cache.views=2",
              f"data.cache.root={tmp_path / 'cache'}"]
    first = train_cli(*common, "trainer.strategy=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.sync_batchnorm=false", f"hydra.run.dir={tmp_path / 'run1'}")
    assert first.returncode == 0, first.stderr[-3000:]
    # The two ranks write to one stderr, so their lines may run together: match the messages, not the lines.
    computed = re.findall(r"feature cache: computing (\d+) of (\d+) views of \S*?(shard-\d{4}\.bin)", first.stderr)
    assert sorted(computed) == [("12", "12", "shard-0000.bin"), ("12", "12", "shard-0001.bin")]  # 24 views, no twice
    (folder,) = (tmp_path / "cache").iterdir()
    crcs = [np.load(folder / f"shard-000{j}.crc.npy") for j in (0, 1)]
    assert all((c >= 0).all() for c in crcs)

    # The same cache from one process (the key of train.py's seed-0 backbone): both shards reused, none recomputed.
    torch.manual_seed(0)
    backbone = build_backbone("vit_test")
    dataset = SyntheticScenes(num_images=12, size=(128, 128))
    pipeline = train_transform(("mask",), 32, 32, (0.75, 1.5), True, True)
    cache = FeatureCache(tmp_path / "cache", "vit_test", backbone, dataset, pipeline, ("mask",), views=2, num_classes=6)
    assert cache.folder == folder
    cached = cache.prepare()
    assert "feature cache: computing" not in capfd.readouterr().err
    _assert_fresh(cache, cached, [0, 23])
