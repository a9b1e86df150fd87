"""Dataset presets read tiny synthetic twins written in each release's exact layout and encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exporters import mask_to_png
from labeler.datasets import PRESETS, classes_present, get_preset, preset_names, to_dataset_ids
from labeler.datasets.classes import CITYSCAPES_LABEL_TO_TRAIN
from labeler.jobs.datasets import FINDERS, open_dataset

RNG = np.random.default_rng(0)


def _image(path: Path, size: tuple[int, int] = (6, 4)) -> None:
    """A random RGB photo (JPEG or PNG by suffix) of (width, height) ``size``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _grey(path: Path, ids: np.ndarray) -> None:
    """A single-channel 'L' PNG, as mmsegmentation's converters and most releases write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def _decoded(dataset) -> dict[str, np.ndarray]:
    return {key: gt for _, key, gt in dataset.iter()}


def test_registry_lists_every_preset_and_rejects_unknown_names() -> None:
    assert set(preset_names()) == {
        "voc",
        "voc21",
        "context59",
        "context60",
        "ade150",
        "cityscapes",
        "foodseg103",
        "uecfoodpix",
        "camvid",
        "folder",
    }
    assert set(FINDERS) == set(PRESETS)
    with pytest.raises(KeyError, match="unknown dataset 'pascal'; choose one of voc, voc21"):
        get_preset("pascal")
    sizes = {name: preset.num_classes for name, preset in PRESETS.items()}
    assert sizes == {
        "voc": 20,
        "voc21": 20,
        "context59": 59,
        "context60": 59,
        "ade150": 150,
        "cityscapes": 19,
        "foodseg103": 103,
        "uecfoodpix": 102,
        "camvid": 11,
    }
    for preset in PRESETS.values():  # usable as prompts: unique, stripped, no commas
        names = [name.lower() for name in preset.class_names]
        assert len(set(names)) == len(names)
        assert all(name == name.strip() and "," not in name for name in names)


def test_background_rules() -> None:
    assert not get_preset("voc").background_is_class
    assert get_preset("voc21").background_is_class
    assert get_preset("voc", background=True).score_protocol().exclude_background is False
    assert get_preset("context59").score_protocol().exclude_background is True
    assert get_preset("foodseg103", background=True).background_is_class
    for name in ("ade150", "cityscapes", "camvid"):
        with pytest.raises(ValueError, match="no background class"):
            get_preset(name, background=True)
    with pytest.raises(ValueError, match="labels and ignore_index are for 'folder'"):
        get_preset("voc", labels=["cat"])
    with pytest.raises(ValueError, match="needs its class names"):
        get_preset("folder")


def test_voc_palette_pngs_with_255_borders(tmp_path: Path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    gt = np.zeros((4, 6), np.uint8)
    gt[1:3, 1:3] = 8  # cat
    gt[0, :] = 255  # object border
    gt[3, 4:] = 15  # person
    for name in ("2007_000033", "2007_000042"):
        _image(base / "JPEGImages" / f"{name}.jpg")
        path = base / "SegmentationClass" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        mask_to_png(gt).save(path)  # palette "P", the VOC colour map, as released
    listing = base / "ImageSets" / "Segmentation"
    listing.mkdir(parents=True)
    (listing / "val.txt").write_text("2007_000033\n2007_000042\n")
    (listing / "train.txt").write_text("2007_000042\n2007_000099\n")

    for root in (tmp_path, tmp_path / "VOCdevkit", base):  # any level of the usual nesting
        dataset = open_dataset("voc", root)
        assert dataset.split == "val" and dataset.root == base
        assert [s.key for s in dataset.samples] == ["2007_000033", "2007_000042"]
    decoded = _decoded(dataset)["2007_000033"]
    np.testing.assert_array_equal(decoded, gt)
    assert dataset.preset.classes_present(decoded) == [8, 15]
    assert dataset.preset.names_of([8, 15]) == ["cat", "person"]
    assert [key for _, key, _ in dataset.iter(limit=1)] == ["2007_000033"]
    assert open_dataset("voc21", tmp_path).preset.background_is_class

    with pytest.raises(ValueError, match=r"1 of the 2 listed images lack.*2007_000099"):
        open_dataset("voc", tmp_path, split="train")
    with pytest.raises(ValueError, match="has no split 'test'; choose one of train, val"):
        open_dataset("voc", tmp_path, split="test")
    with pytest.raises(ValueError, match=r"no PASCAL VOC 2012 \(PAS-20\) layout.*JPEGImages"):
        open_dataset("voc", tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages")


def test_pas20_scores_a_voc_image_by_the_protocol(tmp_path: Path) -> None:
    """Half background, half cat, all predicted cat: PAS-20 100, VOC-21 25 (background 0)."""
    gt = np.zeros((4, 6), np.uint8)
    gt[2:] = 8
    gt[0, 0] = 255
    base = tmp_path / "VOC2012"
    _image(base / "JPEGImages" / "a.jpg")
    (base / "SegmentationClass").mkdir(parents=True)
    mask_to_png(gt).save(base / "SegmentationClass" / "a.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    figures = {}
    for name in ("voc", "voc21"):
        dataset = open_dataset(name, tmp_path)
        ((_, _, decoded),) = dataset.iter()
        present = dataset.preset.classes_present(decoded)  # the paper's per-image prompt
        assert dataset.preset.names_of(present) == ["cat"]
        prediction = to_dataset_ids(np.ones_like(decoded), present)  # prompt label 1 -> cat (8)
        score = dataset.preset.new_score()
        score.add(prediction, decoded)
        figures[name] = score.summary()
    assert figures["voc"]["mIoU"] == pytest.approx(100.0)
    assert figures["voc21"]["mIoU"] == pytest.approx((0.0 + 100 * 12 / 23) / 2)
    assert figures["voc"]["num_pixels"] == 12 and figures["voc21"]["num_pixels"] == 23


def test_context59_converted_layout(tmp_path: Path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2010"
    gt = np.array([[0, 0, 1, 59], [15, 15, 0, 37]], np.uint8)  # 0 = outside the 59 classes
    _image(base / "JPEGImages" / "2008_000002.jpg", (4, 2))
    _grey(base / "SegmentationClassContext" / "2008_000002.png", gt)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    dataset = open_dataset("context59", tmp_path)
    decoded = _decoded(dataset)["2008_000002"]
    np.testing.assert_array_equal(decoded, gt)
    assert dataset.preset.names_of(dataset.preset.classes_present(decoded)) == [
        "aeroplane",
        "cat",
        "person",
        "wood",
    ]
    assert dataset.preset.score_protocol().exclude_background
    assert not open_dataset("context60", tmp_path).preset.score_protocol().exclude_background
    _grey(base / "SegmentationClassContext" / "2008_000002.png", np.full((2, 4), 60))
    with pytest.raises(ValueError, match=r"2008_000002.png: ground truth holds ids \[60\]"):
        _decoded(dataset)


def test_ade150_other_is_ignored(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    gt = np.array([[0, 1, 150], [13, 0, 3]], np.uint8)
    for split, folder in (("val", "validation"), ("train", "training")):
        _image(base / "images" / folder / f"ADE_{split}_00000001.jpg", (3, 2))
        _grey(base / "annotations" / folder / f"ADE_{split}_00000001.png", gt)
    dataset = open_dataset("ade150", tmp_path)
    assert [s.key for s in dataset.samples] == ["ADE_val_00000001"]
    decoded = _decoded(dataset)["ADE_val_00000001"]
    np.testing.assert_array_equal(decoded, [[255, 1, 150], [13, 255, 3]])
    assert dataset.preset.names_of(dataset.preset.classes_present(decoded)) == [
        "wall",
        "sky",
        "person",
        "flag",
    ]
    assert open_dataset("ade150", base, split="train").samples[0].key == "ADE_train_00000001"


def test_cityscapes_label_ids_and_train_ids(tmp_path: Path) -> None:
    base = tmp_path / "cityscapes"
    # labelIds: 0 unlabeled, 4 static, 7 road, 26 car, 33 bicycle, 9 parking, 30 trailer.
    label_ids = np.array([[0, 4, 7, 26], [33, 9, 30, 24]], np.uint8)
    stem = "frankfurt_000000_000294"
    _image(base / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", (4, 2))
    _grey(base / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", label_ids)
    # A second city converted to trainIds (mmsegmentation's converter), which wins when present.
    other = "lindau_000000_000019"
    train_ids = np.array([[0, 18, 255, 13], [5, 255, 10, 11]], np.uint8)
    _image(base / "leftImg8bit" / "val" / "lindau" / f"{other}_leftImg8bit.png", (4, 2))
    _grey(base / "gtFine" / "val" / "lindau" / f"{other}_gtFine_labelTrainIds.png", train_ids)
    _grey(base / "gtFine" / "val" / "lindau" / f"{other}_gtFine_labelIds.png", label_ids)

    dataset = open_dataset("cityscapes", tmp_path)
    assert [(s.key, s.kind) for s in dataset.samples] == [
        (f"frankfurt/{stem}", "labelIds"),
        (f"lindau/{other}", "labelTrainIds"),
    ]
    decoded = _decoded(dataset)
    np.testing.assert_array_equal(
        decoded[f"frankfurt/{stem}"], [[255, 255, 1, 14], [19, 255, 255, 12]]
    )
    np.testing.assert_array_equal(decoded[f"lindau/{other}"], [[1, 19, 255, 14], [6, 255, 11, 12]])
    names = dataset.preset.names_of(dataset.preset.classes_present(decoded[f"frankfurt/{stem}"]))
    assert names == ["road", "person", "car", "bicycle"]
    # Every labelId maps where cityscapesScripts says: the 19 evaluated ids to trainId + 1.
    all_ids = np.arange(34, dtype=np.uint8)[None, :]
    mapped = dataset.preset.decode(all_ids, "labelIds")[0]
    expected = [
        CITYSCAPES_LABEL_TO_TRAIN[i] + 1 if i in CITYSCAPES_LABEL_TO_TRAIN else 255
        for i in range(34)
    ]
    np.testing.assert_array_equal(mapped, expected)


def test_foodseg103_release_layout(tmp_path: Path) -> None:
    base = tmp_path / "FoodSeg103" / "Images"
    gt = np.array([[0, 1, 103], [66, 0, 0]], np.uint8)
    _image(base / "img_dir" / "test" / "00000001.jpg", (3, 2))
    _grey(base / "ann_dir" / "test" / "00000001.png", gt)
    dataset = open_dataset("foodseg103", tmp_path)
    assert dataset.split == "test"
    decoded = _decoded(dataset)["00000001"]
    np.testing.assert_array_equal(decoded, gt)
    assert dataset.preset.names_of(dataset.preset.classes_present(decoded)) == [
        "candy",
        "rice",
        "other ingredients",
    ]
    assert open_dataset("foodseg103", base.parent, background=True).preset.background_is_class
    _image(base / "img_dir" / "train" / "x.jpg")
    (base / "ann_dir" / "train").mkdir(parents=True)
    _grey(base / "ann_dir" / "train" / "y.png", gt)
    with pytest.raises(ValueError, match=r"have no \.jpg image.*\(first: y\)"):
        open_dataset("foodseg103", tmp_path, split="train")


def test_uecfoodpix_id_in_the_red_channel(tmp_path: Path) -> None:
    base = tmp_path / "UECFOODPIXCOMPLETE" / "data" / "UECFoodPIXCOMPLETE"
    ids = np.array([[0, 1, 102], [36, 36, 0]], np.uint8)
    rgb = RNG.integers(0, 256, (2, 3, 3), dtype=np.uint8)  # junk in green and blue
    rgb[..., 0] = ids
    _image(base / "test" / "img" / "10.jpg", (3, 2))
    (base / "test" / "mask").mkdir(parents=True)
    Image.fromarray(rgb, mode="RGB").save(base / "test" / "mask" / "10.png")
    dataset = open_dataset("uecfoodpix", tmp_path)
    decoded = _decoded(dataset)["10"]
    np.testing.assert_array_equal(decoded, ids)
    assert dataset.preset.names_of(dataset.preset.classes_present(decoded)) == [
        "rice",
        "miso soup",
        "beverage",
    ]
    _grey(base / "test" / "mask" / "10.png", ids)  # a grey mask is not this release's encoding
    with pytest.raises(ValueError, match="red channel"):
        _decoded(dataset)


def test_camvid_segnet_layout_void_ignored(tmp_path: Path) -> None:
    base = tmp_path / "CamVid"
    annot = np.array([[0, 3, 11], [10, 11, 8]], np.uint8)  # 11 = void
    for split in ("train", "val", "test"):
        _image(base / split / "0001TP_008550.png", (3, 2))
        _grey(base / f"{split}annot" / "0001TP_008550.png", annot)
    dataset = open_dataset("camvid", tmp_path)
    assert dataset.split == "test"
    decoded = _decoded(dataset)["0001TP_008550"]
    np.testing.assert_array_equal(decoded, [[1, 4, 255], [11, 255, 9]])
    assert dataset.preset.names_of(dataset.preset.classes_present(decoded)) == [
        "sky",
        "road",
        "car",
        "bicyclist",
    ]
    assert dataset.preset.score_protocol().exclude_background  # class 0 out of the mean
    _grey(base / "testannot" / "0001TP_008550.png", np.full((2, 3), 12))
    with pytest.raises(ValueError, match=r"ids \[12\]"):
        _decoded(dataset)


def test_folder_of_ones_own(tmp_path: Path) -> None:
    images, gts = tmp_path / "images", tmp_path / "gt"
    gt = np.array([[0, 1, 2], [9, 255, 2]], np.uint8)
    for key in ("a", "nested/b"):
        _image(images / f"{key}.jpg", (3, 2))
        (gts / key).parent.mkdir(parents=True, exist_ok=True)
        mask_to_png(gt).save(gts / f"{key}.png")
    _image(images / "no_truth.jpg", (3, 2))
    dataset = open_dataset(
        "folder", images, labels=["cat", "dog"], gt_dir=gts, ignore_index=[9], background=False
    )
    assert [s.key for s in dataset.samples] == ["a", "nested/b"]
    assert dataset.unmatched == ["no_truth"]
    decoded = _decoded(dataset)
    np.testing.assert_array_equal(decoded["nested/b"], [[0, 1, 2], [255, 255, 2]])
    assert dataset.preset.score_protocol().exclude_background
    with pytest.raises(ValueError, match=r"ids \[9\]"):
        _decoded(open_dataset("folder", images, labels=["cat", "dog"], gt_dir=gts))
    with pytest.raises(ValueError, match="needs the ground-truth folder"):
        open_dataset("folder", images, labels=["cat"])


def test_classes_present_and_to_dataset_ids() -> None:
    gt = np.array([[0, 5, 255], [2, 5, 0]], np.uint8)
    assert classes_present(gt, num_classes=5) == [2, 5]
    prediction = np.array([[0, 2, 255], [1, 2, 1]], np.uint8)  # prompted with [2, 5]
    np.testing.assert_array_equal(to_dataset_ids(prediction, [2, 5]), [[0, 5, 255], [2, 5, 2]])
    with pytest.raises(ValueError, match=r"mask ids \[3\]"):
        to_dataset_ids(np.array([[3]], np.uint8), [2, 5])
