"""COCO reader round trip and COCOEvaluator against pycocotools' COCOeval called directly."""

import contextlib
import io
import json
import os
import socket
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from dense_data.coco import COCODetection, write_coco  # noqa: E402
from tasks.metrics.coco import COCOEvaluator  # noqa: E402

NAMES = ["cat", "dog", "bird"]


def tiny_samples():
    rng = np.random.default_rng(0)
    img = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    return [
        {
            "image": img(32, 40),
            "boxes": np.array([[1, 2, 11, 22], [5.5, 6, 30, 31]], np.float32),
            "labels": np.array([0, 2]),
        },
        {"image": img(24, 24), "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)},
        {"image": img(40, 36), "boxes": np.array([[3, 4, 20, 30]], np.float32), "labels": np.array([1])},
    ]


# ---------------------------------------------------------------- reader
def test_write_read_round_trip(tmp_path):
    samples = tiny_samples()
    image_dir, ann_file = write_coco(tmp_path, samples, NAMES)
    data = json.loads(ann_file.read_text())
    # add a crowd box and a zero-area box to image 3 by hand
    data["annotations"].append(
        {"id": 100, "image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1}
    )
    data["annotations"].append(
        {"id": 101, "image_id": 3, "category_id": 2, "bbox": [5, 5, 0, 7], "area": 0, "iscrowd": 0}
    )
    ann_file.write_text(json.dumps(data))

    ds = COCODetection(image_dir, ann_file)
    assert len(ds) == 3 and ds.class_names == NAMES and ds.cat_ids == [1, 2, 3]
    for s, got in zip(samples, (ds[i] for i in range(3))):
        assert np.array_equal(got["image"], s["image"])
        assert got["boxes"].dtype == np.float32 and got["labels"].dtype == np.int64
        np.testing.assert_allclose(got["boxes"], s["boxes"], atol=1e-5)
        assert got["labels"].tolist() == list(s["labels"])
        assert got["meta"]["orig_size"] == s["image"].shape[:2]
    assert ds[1]["boxes"].shape == (0, 4)  # empty image kept
    crowd = COCODetection(image_dir, ann_file, keep_crowd=True)[2]
    assert crowd["boxes"].shape == (2, 4) and crowd["labels"].tolist() == [1, 0]


def test_category_ids_sorted_and_contiguous(tmp_path):
    _, ann_file = write_coco(tmp_path, tiny_samples(), NAMES)
    data = json.loads(ann_file.read_text())
    remap = {1: 7, 2: 90, 3: 3}
    for c in data["categories"]:
        c["id"] = remap[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    ann_file.write_text(json.dumps(data))
    ds = COCODetection(tmp_path / "images", ann_file)
    assert ds.cat_ids == [3, 7, 90] and ds.class_names == ["bird", "cat", "dog"]
    assert ds[0]["labels"].tolist() == [1, 0]  # cat -> 1, bird -> 0


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        COCODetection(tmp_path / "nowhere", tmp_path / "a.json")
    image_dir, ann_file = write_coco(tmp_path, tiny_samples(), NAMES)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        COCODetection(image_dir, tmp_path / "missing.json")
    (image_dir / "000002.png").write_bytes(b"not a png")
    ds = COCODetection(image_dir, ann_file)
    with pytest.raises(Exception, match="000002.png"):
        ds[1]


# ---------------------------------------------------------------- evaluation
def gt_dataset():
    """Four 100x100 images; image 4 has no boxes. Small, medium and large boxes."""
    anns = [
        (1, 1, [10, 10, 50, 40]),
        (1, 2, [60, 60, 30, 30]),
        (2, 1, [5, 5, 6, 6]),
        (2, 3, [20, 30, 70, 60]),
        (3, 2, [0, 0, 99, 99]),
        (3, 2, [40, 40, 10, 20]),
    ]
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 100, "width": 100} for i in range(1, 5)],
        "annotations": [
            {"id": k + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (im, c, b) in enumerate(anns)
        ],
        "categories": [{"id": c, "name": n} for c, n in zip([1, 2, 3], NAMES)],
    }


def make_coco(dataset):
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def reference_ap(dataset, results):
    gt = make_coco(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6]


def to_predictions(results, image_ids):
    """COCO result dicts -> per-image xyxy predictions with contiguous labels (cat id - 1)."""
    preds = []
    for i in image_ids:
        rs = [r for r in results if r["image_id"] == i]
        boxes = torch.tensor(
            [[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]] for r in rs]
        ).reshape(-1, 4)
        preds.append(
            {
                "boxes": boxes.double(),
                "scores": torch.tensor([r["score"] for r in rs], dtype=torch.float64),
                "labels": torch.tensor([r["category_id"] - 1 for r in rs], dtype=torch.long),
            }
        )
    return preds


def perturbed_results(dataset):
    rng = np.random.default_rng(1)
    out = []
    for a in dataset["annotations"]:
        x, y, w, h = a["bbox"]
        if a["id"] == 2:
            continue  # a miss
        dx, dy = rng.uniform(-0.2, 0.2, 2) * [w, h]
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x + dx, y + dy, w, h],
                "score": float(rng.uniform(0.3, 1)),
            }
        )
    out.append({"image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 30.0, 30.0], "score": 0.95})  # false positives
    out.append({"image_id": 4, "category_id": 1, "bbox": [10.0, 10.0, 50.0, 50.0], "score": 0.9})
    out.append({"image_id": 3, "category_id": 2, "bbox": [41.0, 41.0, 10.0, 20.0], "score": 0.2})  # duplicate
    return out


def test_perfect_predictions_score_one():
    ds = gt_dataset()
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in ds["annotations"]
    ]
    m = COCOEvaluator(make_coco(ds), cat_ids=[1, 2, 3])
    m.update([1, 2, 3, 4], to_predictions(results, [1, 2, 3, 4]))
    out = m.compute()
    assert set(out) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for k in out:
        assert out[k] == pytest.approx(1.0), k


def test_perturbed_matches_cocoeval():
    ds = gt_dataset()
    results = perturbed_results(ds)
    ref = reference_ap(ds, results)
    assert 0.1 < ref[0] < 0.9  # the case is not degenerate
    m = COCOEvaluator(make_coco(ds), cat_ids=[1, 2, 3])
    m.update([1, 2], to_predictions(results, [1, 2]))  # two update calls, like two batches
    m.update([3, 4], to_predictions(results, [3, 4]))
    out = m.compute()
    for k, r in zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], ref):
        assert out[k] == pytest.approx(float(r), abs=1e-12), k


def test_topk_per_image_keeps_the_highest_scores():
    ds = gt_dataset()
    results = perturbed_results(ds)
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    kept = [r for rs in by_image.values() for r in sorted(rs, key=lambda r: -r["score"])[:1]]
    ref = reference_ap(ds, kept)
    assert tuple(ref) != tuple(reference_ap(ds, results))  # keeping one per image changes the AP
    m = COCOEvaluator(make_coco(ds), cat_ids=[1, 2, 3], topk=1)
    m.update([1, 2, 3, 4], to_predictions(results, [1, 2, 3, 4]))
    out = m.compute()
    for k, r in zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], ref):
        assert out[k] == pytest.approx(float(r), abs=1e-12), k
    with pytest.raises(ValueError, match="topk"):
        COCOEvaluator(make_coco(ds), topk=0)


def test_image_without_predictions_counts_as_misses(tmp_path):
    ds = gt_dataset()
    results = [r for r in perturbed_results(ds) if r["image_id"] != 2]
    ref = reference_ap(ds, results)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ds))
    m = COCOEvaluator(path)  # from a path, default cat ids
    m.update([1, 2, 3, 4], to_predictions(results, [1, 2, 3, 4]))  # image 2 gets an empty prediction
    out = m.compute()
    assert out["AP"] == pytest.approx(float(ref[0]), abs=1e-12)


def test_no_annotations_and_no_predictions():
    ds = gt_dataset()
    empty_gt = {**ds, "annotations": []}
    m = COCOEvaluator(make_coco(empty_gt), cat_ids=[1, 2, 3])
    m.update(
        [1, 2], to_predictions([{"image_id": 1, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.5}], [1, 2])
    )
    assert all(v == -1.0 for v in m.compute().values())
    m = COCOEvaluator(make_coco(ds), cat_ids=[1, 2, 3])
    m.update([1, 2], to_predictions([], [1, 2]))
    out = m.compute()
    assert out["AP"] == 0.0
    m = COCOEvaluator(make_coco({**empty_gt, "categories": []}), cat_ids=[])
    m.update([1], to_predictions([], [1]))
    assert all(v == -1.0 for v in m.compute().values())


# ---------------------------------------------------------------- distributed
def _eval_worker(rank, world, port, outdir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = gt_dataset()
        results = perturbed_results(ds)
        # a DistributedSampler with 4 images on 2 ranks padded to 6 would repeat images: rank 1 sees image 1 again
        ids = [[1, 3, 2], [4, 2, 1]][rank]
        m = COCOEvaluator(make_coco(ds), cat_ids=[1, 2, 3])
        m.update(ids, to_predictions(results, ids))
        torch.save(m.compute(), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gather(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_eval_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                pytest.fail("distributed evaluation hung")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ds = gt_dataset()
    ref = reference_ap(ds, perturbed_results(ds))
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt")
        for k, v in zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], ref):
            assert out[k] == pytest.approx(float(v), abs=1e-12), (r, k)
