"""Bad inputs: each gives a clear error naming the file, key or value, or is handled; nothing is lost or hangs.

Cases tested elsewhere (not repeated here):

- corrupt JPEG in a dataset: ``test_data.py::test_corrupt_image_is_named``; in predict.py (named, skipped, exit 1):
  ``test_predictor.py::test_predict_cli_on_real_photos_with_a_corrupt_file``
- ADE20K label out of range (151): ``test_data.py::test_ade20k_ignore_label_and_out_of_range``
- grey / RGBA / 16-bit images: ``test_data.py::test_read_rgb_converts_gray_rgba_and_16_bit`` (reader) and
  ``test_predictor.py::test_predict_cli_on_real_photos_with_a_corrupt_file`` (predict.py)
- missing or unreadable weights file: ``test_backbones.py::test_missing_or_corrupt_local_file``
- truncated ``head.safetensors`` in an export, truncated checkpoint in ``load_predictor``:
  ``test_export.py::test_wrong_or_truncated_exports_fail_naming_the_file_or_key``
- missing COCO annotation file / corrupt COCO image: ``test_coco.py::test_missing_and_corrupt``
- non-finite loss (error naming the step, the loss term and the batch's files):
  ``test_train.py::test_non_finite_loss_names_the_term_and_files``
"""

import json
import os
import pickle
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import export as export_cli
import predict as predict_cli
from backbones import WeightsError, build_backbone
from dense_data.ade20k import ADE20K
from dense_data.coco import COCODetection, write_coco
from dense_data.datamodule import DenseDataModule
from dense_data.folders import ImageMaskFolders
from dense_data.synthetic import write_ade20k
from heads import DPTHead
from tasks import SegmentationTask, load_predictor
from tasks.export import export_checkpoint
from tasks.outputs import OUTPUT_MARKER
from tasks.predictor import ExportError
from train import check_checkpoint


def _seg_ckpt(path: Path, num_classes: int = 3) -> Path:
    torch.manual_seed(0)
    task = SegmentationTask(backbone={"name": "vit_test"}, head={"_target_": "heads.LinearSegHead", "dropout": 0.0},
                            num_classes=num_classes)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _seg_ckpt(tmp_path_factory.mktemp("ckpt") / "seg.ckpt")


class _Exploit:
    """Unpickling this runs code: it would create the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------------------ datasets
def _mask_folders(root: Path, mask: np.ndarray, image_size=(16, 16)) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((*image_size, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "a.png")
    return root / "images", root / "masks"


def test_label_200_of_150_classes_names_the_mask(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[3, 4] = 200
    images, masks = _mask_folders(tmp_path, mask)
    with pytest.raises(ValueError, match=r"masks/a\.png: label 200 out of range 0\.\.149"):
        ImageMaskFolders(images, masks, num_classes=150)[0]


def test_mask_of_another_size_names_the_file(tmp_path):
    base = write_ade20k(tmp_path, num_train=1, num_val=1, size=(32, 32))
    label_file = next((base / "annotations" / "training").glob("*.png"))
    Image.fromarray(np.ones((20, 32), np.uint8)).save(label_file)
    with pytest.raises(ValueError, match=rf"{label_file.name}: label size \(20, 32\) differs from image \(32, 32\)"):
        ADE20K(tmp_path, "training")[0]


def test_missing_mask_fails_at_start_naming_it(tmp_path):
    base = write_ade20k(tmp_path, num_train=2, num_val=1, size=(32, 32))
    label_file = sorted((base / "annotations" / "training").glob("*.png"))[1]
    label_file.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 annotation\(s\) missing .*{label_file.name}"):
        ADE20K(tmp_path, "training")


@pytest.mark.parametrize("field, value, message", [
    ("bbox", [1, 2, 3], r"'bbox' must be 4 finite numbers"),
    ("bbox", ["a", 2, 3, 4], r"'bbox' must be 4 finite numbers"),
    ("category_id", 999, r"'category_id' 999 is not among the categories"),
])
def test_coco_malformed_annotation_names_file_and_annotation(tmp_path, field, value, message):
    image_dir, ann_file = write_coco(tmp_path, [{"image": np.zeros((20, 20, 3), np.uint8),
                                                 "boxes": np.array([[1, 1, 9, 9]]), "labels": np.array([0])}], ["a"])
    data = json.loads(ann_file.read_text())
    data["annotations"][0][field] = value
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{ann_file.name}: annotation id 1 .*{message}"):
        COCODetection(image_dir, ann_file)


def test_coco_zero_size_boxes_are_dropped(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [{"image": np.zeros((20, 20, 3), np.uint8),
                                                 "boxes": np.array([[1, 1, 9, 9], [4, 4, 4, 12]]),
                                                 "labels": np.array([0, 0])}], ["a"])
    sample = COCODetection(image_dir, ann_file)[0]
    np.testing.assert_array_equal(sample["boxes"], [[1, 1, 9, 9]])


def test_depth_with_nan_and_inf_is_masked_out_of_the_loss():
    head = DPTHead([32] * 4, [16] * 4, max_depth=10.0)
    prediction = (torch.rand(1, 1, 8, 8) * 5 + 0.5).requires_grad_()
    depth = torch.full((1, 8, 8), 2.0)
    depth[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    total = sum(head.loss({"depth": prediction}, {"depth": depth}).values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(prediction.grad).all()
    assert (prediction.grad[0, 0, 0, :3] == 0).all()  # the bad pixels take no part


def test_8x8_image_trains_and_predicts(tmp_path, ckpt):
    tiny = [{"image": np.full((8, 8, 3), 90, np.uint8), "mask": np.ones((8, 8), np.int64), "meta": {"file": "t.png"}}]
    data = DenseDataModule(tiny, tiny, targets=["mask"], num_classes=3, crop_size=32, base_size=32, batch_size=1,
                           num_workers=0)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (1, 3, 32, 32)
    task = SegmentationTask(backbone={"name": "vit_test"}, head={"_target_": "heads.LinearSegHead"}, num_classes=3)
    assert torch.isfinite(task.training_step(batch, 0))
    result = load_predictor(ckpt).predict(np.full((8, 8, 3), 90, np.uint8), mode="slide", crop=32, stride=16)
    assert result["labels"].shape == (8, 8)


def test_6000x8000_slide_accumulates_per_window_batch(ckpt):
    """Crops of at most ``batch_size`` reach the model at a time and the sums live on ``out_device``: the peak
    memory stays a few image-sized float buffers (RSS growth under 3 GB). The network is replaced by a cheap
    stand-in of the same output shape: the windows and the stitching are under test, not the ViT."""
    predictor = load_predictor(ckpt)
    calls = []

    def counting(images):
        calls.append(images.shape)
        return images * 0.5  # (B, 3, h, w): scores of the 3 classes

    predictor.model.forward = counting
    predictor.model.head.predict_upsamples_native = False  # the stand-in gives full-resolution outputs
    image = np.zeros((6000, 8000, 3), np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    statm = Path("/proc/self/statm")
    rss_now = int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else before
    result = predictor.predict(image, mode="slide", crop=1024, stride=1024, batch_size=4, return_probs=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert result["labels"].shape == (6000, 8000)
    assert len(calls) == 12 and all(shape[0] <= 4 and tuple(shape[-2:]) == (1024, 1024) for shape in calls)
    assert peak - min(rss_now, before) < 3e9


# ------------------------------------------------------------------------------------------ weights, checkpoints
def test_malicious_pickle_as_weights_or_checkpoint_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "exploited"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Exploit(marker)}, f)
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Exploit(marker)}}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="evil.pth"):
        build_backbone("vit_test", weights=str(evil))
    with pytest.raises(ExportError, match=r"evil\.ckpt.*weights_only=True"):
        load_predictor(tmp_path / "evil.ckpt")
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    assert predict_cli.main([f"ckpt={tmp_path / 'evil.ckpt'}", f"input={image}", f"output={tmp_path / 'out'}"]) == 2
    assert "evil.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # train.py resume=evil.ckpt
        check_checkpoint(str(tmp_path / "evil.ckpt"))
    assert exit_info.value.code == 2 and "cannot resume from" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_weights_name_the_file(tmp_path):
    path = tmp_path / "vit_test.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone("vit_test").model.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="vit_test.safetensors"):
        build_backbone("vit_test", weights=str(path))


def test_predict_cli_with_a_truncated_checkpoint_exits_2_naming_it(tmp_path, ckpt, capsys):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ckpt.read_bytes()[:5000])
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    assert predict_cli.main([f"ckpt={broken}", f"input={image}", f"output={tmp_path / 'out'}"]) == 2
    assert "broken.ckpt" in capsys.readouterr().err


def test_export_whose_config_names_another_head_fails_naming_it(tmp_path, ckpt):
    export_checkpoint(ckpt, tmp_path / "export", verify=False)
    config = tmp_path / "export" / "config.yaml"
    config.write_text(config.read_text().replace("_target_: heads.LinearSegHead", "_target_: heads.DPTHead"))
    with pytest.raises(ExportError, match=r"config\.yaml: cannot build 'head' 'heads\.DPTHead'.*head\.safetensors"):
        load_predictor(tmp_path / "export")


# ------------------------------------------------------------------------------------------ output folders
def test_export_and_predict_refuse_a_folder_they_did_not_write(tmp_path, ckpt, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("somebody else's\n")
    (theirs / "notes.txt").write_text("keep me\n")
    assert export_cli.main([f"ckpt={ckpt}", f"out={theirs}", "verify=false"]) == 2
    assert f"output folder {theirs} is not empty" in capsys.readouterr().err
    assert (theirs / "config.yaml").read_text() == "somebody else's\n" and not (theirs / OUTPUT_MARKER).exists()

    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    assert predict_cli.main([f"ckpt={ckpt}", f"input={image}", f"output={theirs}", "mode=whole"]) == 2
    assert "overwrite=true" in capsys.readouterr().err

    # Their own folders: written again without asking; an export no longer needing its ONNX file removes it.
    mine = tmp_path / "export"
    assert export_cli.main([f"ckpt={ckpt}", f"out={mine}", "verify=false"]) == 0
    (mine / "model.onnx").write_bytes(b"stale")
    marker = json.loads((mine / OUTPUT_MARKER).read_text())
    (mine / OUTPUT_MARKER).write_text(json.dumps(dict(marker, files=[*marker["files"], "model.onnx"])))
    assert export_cli.main([f"ckpt={ckpt}", f"out={mine}", "verify=false"]) == 0
    assert not (mine / "model.onnx").exists() and (mine / "head.safetensors").exists()
    assert predict_cli.main([f"ckpt={ckpt}", f"input={image}", f"output={tmp_path / 'pred'}", "mode=whole"]) == 0
    assert predict_cli.main([f"ckpt={ckpt}", f"input={image}", f"output={tmp_path / 'pred'}", "mode=whole"]) == 0

    # overwrite=true: their files of our names are replaced, the others stay.
    assert export_cli.main([f"ckpt={ckpt}", f"out={theirs}", "verify=false", "overwrite=true"]) == 0
    assert (theirs / "notes.txt").read_text() == "keep me\n"
    assert "format" in (theirs / "config.yaml").read_text()
