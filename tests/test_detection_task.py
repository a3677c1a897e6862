"""Detection task: end-to-end train.py runs (synthetic, COCO format, 2-process DDP with empty images) and the
mapping of predicted boxes back to the original image size."""

import json
import os

import albumentations as A
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dense_data.coco import COCODetection, write_coco  # noqa: E402
from dense_data.synthetic import OBJECT_NAMES, make_scene  # noqa: E402
from dense_data.transforms import Transformed, collate, eval_transform  # noqa: E402
from tasks.detection import DetectionTask, rescale_boxes  # noqa: E402
from tasks.metrics.coco import STAT_NAMES  # noqa: E402

HEAD = ["head.hidden_dim=32", "head.num_queries=10", "head.enc_layers=1", "head.dec_layers=2", "head.num_heads=2",
        "head.num_points=2", "head.num_levels=2", "head.ffn_dim=64"]
TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "optim.warmup_steps=1", "data.num_workers=0", "data.batch_size=4", "data.crop_size=64", "data.base_size=64",
        *HEAD]


def _metrics(run_dir) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {f"val/{name}" for name in STAT_NAMES}
    assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in metrics.values()), metrics
    return metrics


def _write_coco_split(root, num, size, seed, empty=()):
    """Synthetic scenes written as a COCO set; scenes listed in ``empty`` lose their boxes."""
    samples = []
    for i in range(num):
        scene = make_scene(i, size, seed)
        if i in empty:
            scene["boxes"], scene["labels"] = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        samples.append(scene)
    return write_coco(root, samples, OBJECT_NAMES)


def _coco_overrides(tmp_path, empty=()):
    train_dir, train_ann = _write_coco_split(tmp_path / "train", 8, (64, 64), 0, empty)
    val_dir, val_ann = _write_coco_split(tmp_path / "val", 4, (48, 80), 1, empty)
    return [f"data.train.image_dir={train_dir}", f"data.train.ann_file={train_ann}",
            f"data.val.image_dir={val_dir}", f"data.val.ann_file={val_ann}", "data.num_classes=5"]


def test_demo_detr_trains_validates_and_saves(tmp_path, train_cli):
    run_dir = tmp_path / "run"
    result = train_cli("task=demo_detr", *TINY, "data.train.num_images=8", "data.val.num_images=4",
                       "data.train.size=[64,64]", "data.val.size=[64,64]", f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _metrics(run_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and list((run_dir / "checkpoints").glob("best-*.ckpt"))
    pictures = list((run_dir / "vis").glob("val_boxes_step*.png"))
    assert pictures
    from PIL import Image

    assert Image.open(pictures[0]).size == (2 * 256, 4 * 256)  # 4 rows of (GT | predictions), enlarged to 256
    task = DetectionTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert task.class_names == list(OBJECT_NAMES) and task.head.num_queries == 10


def test_coco_detr_config_trains_on_a_coco_format_set(tmp_path, train_cli):
    run_dir = tmp_path / "run"
    result = train_cli("task=coco_detr", "backbone=vit_test", "backbone.weights=null", "trainer=cpu",
                       f"paths.data_root={tmp_path}", *_coco_overrides(tmp_path), *TINY,
                       "data.eval_short_side=64", "data.val_batch_size=2", "head.one_to_many_k=2",
                       "head.num_queries_one2many=20", f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _metrics(run_dir)
    assert list((run_dir / "vis").glob("val_boxes_step*.png"))


def test_coco_plain_detr_config_trains_with_windows(tmp_path, train_cli):
    """Meta's recipe (3 x 3 windows, Plain-DETR, top 1500 per image) end to end on a tiny ViT and a COCO-format set."""
    run_dir = tmp_path / "run"
    plain = ["head.hidden_dim=32", "head.num_heads=2", "head.enc_layers=1", "head.enc_ffn_dim=64", "head.dec_layers=2",
             "head.dec_ffn_dim=64", "head.rpe_hidden_dim=16", "head.num_queries=10", "head.num_queries_one2many=20",
             "head.one_to_many_k=2", "head.proposal_min_size=16"]
    result = train_cli("task=coco_plain_detr", "backbone=vit_test", "backbone.weights=null", "trainer=cpu",
                       f"paths.data_root={tmp_path}", *_coco_overrides(tmp_path), *TINY[:5], *plain,
                       "data.crop_size=96", "data.base_size=96", "data.eval_short_side=96", "data.val_batch_size=2",
                       f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _metrics(run_dir)
    task = DetectionTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert task.backbone.windows == 3 and len(task.backbone.channels) == 8 and task.eval_topk == 1500


def test_coco_detr_missing_dataset_names_the_layout(tmp_path, train_cli):
    result = train_cli("task=coco_detr", "backbone=vit_test", "trainer=cpu", f"paths.data_root={tmp_path}",
                       f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert f"{tmp_path}/coco/train2017" in result.stderr and "instances_train2017.json" in result.stderr


def test_ddp_two_processes_with_images_without_boxes(tmp_path, train_cli):
    """Half of the images have no boxes and each process sees one image a step: some steps give one process no
    targets at all while the other has some. A hang would hit the subprocess timeout."""
    run_dir = tmp_path / "run"
    result = train_cli("task=demo_detr", "data=coco", "~data.train.size", "~data.val.size",
                       *_coco_overrides(tmp_path, empty=(0, 2, 4, 6)), *TINY, "data.batch_size=1",
                       "trainer.max_steps=6", "trainer.val_check_interval=3", "data.eval_short_side=64",
                       "data.val_batch_size=1", "trainer.accelerator=cpu", "trainer.strategy=ddp_spawn",
                       "trainer.devices=2", "trainer.precision=32-true", "trainer.sync_batchnorm=false",
                       f"hydra.run.dir={run_dir}", timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    _metrics(run_dir)


# ------------------------------------------------------------------ box mapping to the original image
def test_rescale_boxes_by_hand():
    boxes = torch.tensor([[10.7, 6.4, 53.5, 32.0], [-3.0, 50.0, 120.0, 70.0]])
    got = rescale_boxes(boxes, (64, 107), (48, 80))  # (h0, w0) = (48, 80) resized to (64, 107)
    want = torch.tensor([[8.0, 4.8, 40.0, 24.0], [0.0, 37.5, 80.0, 48.0]])  # second box clipped to the image
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def _val_samples():
    """Two scenes of different shapes (48 x 80, 80 x 48) with distinct ids, one without boxes."""
    samples = []
    for i, size in enumerate([(48, 80), (80, 48), (48, 80)]):
        scene = make_scene(i, size, seed=5)
        scene["meta"]["id"] = 100 + i
        if i == 2:
            scene["boxes"], scene["labels"] = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        samples.append(scene)
    return samples


@pytest.mark.parametrize("as_coco", [False, True])
def test_validation_maps_boxes_from_resized_input_to_original(tmp_path, as_coco):
    """The head "predicts" the ground truth boxes in input pixels as albumentations resizes them (an independent
    reference): after the task maps them back, COCO AP must be 1. Without the mapping it must not be."""
    samples = _val_samples()
    dataset = samples
    if as_coco:
        dataset = COCODetection(*write_coco(tmp_path / "coco", samples, OBJECT_NAMES))
    task = DetectionTask(backbone={"name": "vit_test"},
                         head={"_target_": "heads.detr.DETRHead", "hidden_dim": 32, "num_queries": 10,
                               "enc_layers": 1, "dec_layers": 1, "num_levels": 2, "ffn_dim": 64},
                         num_classes=5, class_names=list(OBJECT_NAMES)).eval()
    short_side = 64
    batch = collate([Transformed(dataset, eval_transform(short_side), ("boxes",), resize_labels=False)[i]
                     for i in range(len(dataset))])
    assert [m["image_size"] for m in batch["meta"]] == [(64, 107), (107, 64), (64, 107)]
    resize = A.Compose([A.SmallestMaxSize(short_side)], bbox_params=A.BboxParams("pascal_voc", label_fields=["labels"]))
    inputs = [resize(image=dataset[i]["image"], bboxes=dataset[i]["boxes"], labels=dataset[i]["labels"])
              for i in range(len(dataset))]

    def stub(boxes_of):
        return lambda outputs, image_size: [
            {"boxes": torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4)),
             "scores": torch.full((len(lab),), 0.9), "labels": torch.as_tensor(np.asarray(lab, np.int64))}
            for b, lab in boxes_of]

    results = {}
    for name, boxes_of in (("mapped", [(o["bboxes"], o["labels"]) for o in inputs]),
                           ("unmapped", [(o["bboxes"], o["labels"]) for o in inputs])):
        task.set_ground_truth(dataset)
        task.head.predict = stub(boxes_of)
        if name == "unmapped":  # a task that forgot the mapping: keep boxes in input pixels
            task.predict_boxes = lambda b: task.head.predict(None, None)
        predictions = task.evaluate_batch(batch)
        results[name] = task.val_metrics.compute()
        if name == "mapped":
            for pred, sample in zip(predictions, dataset):
                torch.testing.assert_close(pred["boxes"], torch.as_tensor(sample["boxes"]), atol=1e-3, rtol=0)
    assert results["mapped"]["AP"] == pytest.approx(1.0) and results["mapped"]["AP50"] == pytest.approx(1.0)
    assert results["unmapped"]["AP"] < 0.5
