import numpy as np
import pytest
import torch
from PIL import Image

from dense_data.ade20k import ADE20K
from dense_data.datamodule import DenseDataModule
from dense_data.folders import ClassFolders, ImageMaskFolders
from dense_data.io import CorruptFileError, read_rgb
from dense_data.synthetic import CLASS_NAMES, SyntheticScenes, make_scene, write_ade20k, write_class_folders
from dense_data.transforms import IGNORE_INDEX, Transformed, collate, eval_transform, train_transform


def test_synthetic_is_deterministic_and_consistent():
    a, b, c = make_scene(3, seed=7), make_scene(3, seed=7), make_scene(3, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in ("image", "mask", "depth", "boxes", "labels"))
    assert not np.array_equal(a["image"], c["image"])
    for index in range(10):
        scene = make_scene(index)
        assert scene["image"].shape == (128, 128, 3) and scene["image"].dtype == np.uint8
        assert scene["mask"].max() < len(CLASS_NAMES) and scene["depth"].min() > 0
        for box, label in zip(scene["boxes"], scene["labels"]):
            x0, y0, x1, y1 = box.astype(int)
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert (scene["mask"][y0:y1, x0:x1] == label + 1).any()  # box holds pixels of its class
        assert scene["label"] in scene["labels"]


def test_ade20k_round_trip(tmp_path):
    write_ade20k(tmp_path, num_train=3, num_val=2, size=(64, 80))
    train = ADE20K(tmp_path, "training")
    val = ADE20K(tmp_path / "ADEChallengeData2016", "val")
    assert len(train) == 3 and len(val) == 2
    sample = train[1]
    np.testing.assert_array_equal(sample["mask"], make_scene(1, (64, 80), seed=0)["mask"])
    assert sample["image"].shape == (64, 80, 3)


def test_ade20k_ignore_label_and_out_of_range(tmp_path):
    base = write_ade20k(tmp_path, num_train=1, num_val=1, size=(32, 32))
    label_file = next((base / "annotations" / "training").glob("*.png"))
    label = np.zeros((32, 32), np.uint8)
    label[0, 0] = 1
    Image.fromarray(label).save(label_file)
    mask = ADE20K(tmp_path, "training")[0]["mask"]
    assert mask[0, 0] == 0 and (mask.ravel()[1:] == IGNORE_INDEX).all()
    label[0, 0] = 151
    Image.fromarray(label).save(label_file)
    with pytest.raises(ValueError, match=r"ADE_train_00000000.png: label 151 out of range"):
        ADE20K(tmp_path, "training")[0]


def test_missing_dataset_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)not found: .*nowhere.*expected layout.*ADEChallengeData2016"):
        ADE20K(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere/train.*<class name>"):
        ClassFolders(tmp_path / "nowhere")


def test_corrupt_image_is_named(tmp_path):
    base = write_ade20k(tmp_path, num_train=2, num_val=1, size=(32, 32))
    broken = sorted((base / "images" / "training").glob("*.jpg"))[1]
    broken.write_bytes(b"\xff\xd8 truncated")
    dataset = ADE20K(tmp_path, "training")
    dataset[0]
    with pytest.raises(CorruptFileError, match=broken.name):
        dataset[1]


def test_read_rgb_converts_gray_rgba_and_16_bit(tmp_path):
    Image.fromarray(np.full((4, 5), 128, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((4, 5, 4), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(tmp_path / "i16.png")
    for name, value in (("g.png", 128), ("a.png", 200), ("i16.png", 255)):
        image = read_rgb(tmp_path / name)
        assert image.shape == (4, 5, 3) and image.dtype == np.uint8 and int(image[0, 0, 0]) == value


def test_class_folders_round_trip(tmp_path):
    write_class_folders(tmp_path, num_train=6, num_val=3, size=(32, 32))
    train = ClassFolders(tmp_path, "train")
    assert train.class_names == sorted(CLASS_NAMES[1:])
    for i in range(len(train)):
        path, label = train.samples[i]
        assert path.split("/")[-2] == train.class_names[label]


def test_image_mask_folders_check_labels(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "msk" / "a.png")
    with pytest.raises(ValueError, match=r"a.png: label 7 out of range 0..4"):
        ImageMaskFolders(tmp_path / "img", tmp_path / "msk", num_classes=5)[0]
    assert ImageMaskFolders(tmp_path / "img", tmp_path / "msk", num_classes=8)[0]["mask"].max() == 7


def test_train_pipeline_is_joint_and_pads_with_ignore():
    """Flip, resize and crop move image, mask and depth together; padding is ignore (mask) / invalid (depth)."""
    scene = make_scene(0, size=(64, 64))
    # Encode the class in the image so alignment can be checked after augmentation.
    scene["image"] = np.repeat((scene["mask"] * 40).astype(np.uint8)[..., None], 3, axis=2)
    scene["depth"] = scene["mask"].astype(np.float32) + 1.0
    for targets, fill in ((("mask",), IGNORE_INDEX), (("depth",), 0.0)):
        pipeline = train_transform(targets, crop_size=96, base_size=64, scale_range=(0.5, 1.0), photometric=False)
        for seed in range(5):
            np.random.seed(seed)
            out = Transformed([scene], pipeline, targets)[0]
            target = out[targets[0]]
            assert target.shape == (96, 96)
            valid = target != fill
            assert (~valid).any()  # the scaled image is smaller than the crop: padding present
            grey = (out["image"][0] * 0.229 + 0.485) * 255
            expected = (target[valid] - (1 if targets == ("depth",) else 0)) * 40
            assert (grey[valid] - expected).abs().median() < 3


def test_fixed_crop_and_rotation_keep_depth_aligned_and_fill_invalid():
    """Meta's NYU crop cuts the box first; a rotation resamples depth nearest and fills uncovered corners with 0."""
    image = np.zeros((48, 64, 3), np.uint8)
    image[10:20, 5:30] = 200
    depth = np.full((48, 64), 2.0, np.float32)
    depth[10:20, 5:30] = 7.0
    pipeline = train_transform(("depth",), crop_size=(32, 48), base_size=38, scale_range=(1.0, 1.0), flip=False,
                               photometric=False, fixed_crop=(40, 60, 600, 440), rotate=30.0)
    rotated = 0
    for seed in range(8):
        out = Transformed([{"image": image, "depth": depth}], pipeline, ("depth",))[(0, seed)]  # (index, aug seed)
        values = set(np.unique(out["depth"].numpy()).tolist())
        assert values <= {0.0, 2.0, 7.0}  # nearest resampling: no blended depths
        rotated += 0.0 in values
        grey = (out["image"][0] * 0.229 + 0.485) * 255
        bright = out["depth"] == 7.0
        assert (grey[bright] > 100).float().mean() > 0.9
    assert 0 < rotated < 8  # rotation with probability 0.5 uncovers corners (depth 0 = invalid)
    plain = train_transform(("depth",), crop_size=(38, 56), base_size=38, scale_range=(1.0, 1.0), flip=False,
                            photometric=False, fixed_crop=(40, 60, 600, 440))  # (4, 6, 60, 44) of 64x48
    out = Transformed([{"image": image, "depth": depth}], plain, ("depth",))[0]
    assert tuple(out["depth"].shape) == (38, 56) and torch.equal(out["depth"][4:14, 1:26],
                                                                  torch.full((10, 25), 7.0))


def test_boxes_follow_flip_and_resize():
    scene = make_scene(1, size=(64, 64))
    pipeline = train_transform(("boxes",), crop_size=128, base_size=128, scale_range=(1.0, 1.0), photometric=False)
    out = Transformed([scene], pipeline, ("boxes",))[0]
    boxes = out["boxes"].numpy()
    scaled = scene["boxes"] * 2
    flipped = scaled.copy()
    flipped[:, [0, 2]] = 128 - scaled[:, [2, 0]]
    assert np.allclose(boxes, scaled, atol=1) or np.allclose(boxes, flipped, atol=1)
    assert out["labels"].tolist() == scene["labels"].tolist()


def test_eval_keeps_labels_at_file_size_and_collate_pads():
    scenes = [make_scene(0, size=(48, 64)), make_scene(1, size=(64, 40))]
    dataset = Transformed(scenes, eval_transform(short_side=32), ("mask",), resize_labels=False)
    first = dataset[0]
    assert first["image"].shape[-2:] == (32, 43) and first["mask"].shape == (48, 64)
    batch = collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 51, 43) and batch["mask"].shape == (2, 64, 64)
    assert (batch["mask"][0, 48:] == IGNORE_INDEX).all() and (batch["image"][0, :, 32:] == 0).all()
    assert [m["image_size"] for m in batch["meta"]] == [(32, 43), (51, 32)]


def test_missing_target_is_explained():
    dataset = Transformed([{"image": np.zeros((8, 8, 3), np.uint8), "meta": {"file": "x.jpg"}}],
                          eval_transform(), ("mask",))
    with pytest.raises(KeyError, match="x.jpg has no \\['mask'\\]"):
        dataset[0]


def test_datamodule_batches():
    dm = DenseDataModule(SyntheticScenes(6), SyntheticScenes(3, seed=1), ["mask"], 6, crop_size=64, batch_size=4,
                         num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].dtype == torch.long
    assert dm.class_names == list(CLASS_NAMES)
    val = next(iter(dm.val_dataloader()))
    assert val["mask"].shape == (3, 128, 128)


def test_ade20k_class_names_reach_the_datamodule(tmp_path):
    write_ade20k(tmp_path, num_train=1, num_val=1, size=(32, 32))
    dm = DenseDataModule(ADE20K(tmp_path), ADE20K(tmp_path, "val"), ["mask"], 150, num_workers=0)
    assert len(dm.class_names) == 150 and dm.class_names[0] == "wall" and dm.class_names[-1] == "flag"
