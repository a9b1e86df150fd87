"""The dataset-shaped exports of ``pseudo-label``: CVAT "Segmentation mask 1.1" read back by
datumaro (the reader CVAT itself uses), and Hugging Face ``datasets`` read back by
``load_from_disk`` and the Parquet loader; both compared with the PNG masks."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exporters import mask_to_png, png_to_mask
from exporters.cvat import VOID, object_mask
from exporters.polygons import label_components
from labeler.jobs.dataset_exports import write_cvat_mask, write_hf
from labeler.jobs.extras import MissingExtraError, require_extra
from labeler.jobs.layout import mask_path, record_path

from .support import run_cli
from .tool_env import DATUMARO

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["ring", "dots"]

# Read a CVAT mask export with datumaro, in its own environment: per image, the class ids
# rebuilt from the class masks, and the number of objects of each label.
_DATUMARO_READER = """
import json, sys
import numpy as np
import datumaro as dm
folder, target = sys.argv[1], sys.argv[2]
classes = dm.Dataset.import_from(folder, "voc_segmentation")
objects = dm.Dataset.import_from(folder, "voc_instance_segmentation")
names = [c.name for c in classes.categories()[dm.AnnotationType.label]]
masks, counts = {}, {}
for item in classes:
    ids = None
    for ann in item.annotations:
        image = ann.image
        if ids is None:
            ids = np.zeros(image.shape, np.uint8)
        ids[image.astype(bool)] = names.index(names[ann.label])
    masks[item.id] = ids
for item in objects:
    per_label = {}
    for ann in item.annotations:
        if names[ann.label] != "background":  # datumaro reports the background as one object
            per_label[names[ann.label]] = per_label.get(names[ann.label], 0) + 1
    counts[item.id] = per_label
np.savez(target, **{k: v for k, v in masks.items() if v is not None})
print(json.dumps({"names": names, "objects": counts}))
"""


def shapes_mask() -> np.ndarray:
    """A ring (label 1, with a hole holding a dot of label 2), and label 2 in three parts
    in all, with a void corner."""
    mask = np.zeros((40, 48), np.uint8)
    mask[5:25, 5:25] = 1
    mask[10:20, 10:20] = 0  # the hole
    mask[13:16, 13:16] = 2  # a part inside the hole
    mask[30:36, 30:36] = 2
    mask[2:6, 40:46] = 2
    mask[36:, :4] = VOID
    return mask


def write_done_images(images: Path, out: Path, masks: dict[str, np.ndarray]) -> list[Path]:
    """A run's per-image files (image, mask PNG, record) for hand-made masks."""
    done = []
    for name, mask in masks.items():
        relative = Path(f"{name}.png")
        images.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*mask.shape, 3), 90, np.uint8)).save(images / relative)
        mask_path(out, relative).parent.mkdir(parents=True, exist_ok=True)
        mask_to_png(mask).save(mask_path(out, relative))
        present = [LABELS[i - 1] for i in range(1, len(LABELS) + 1) if (mask == i).any()]
        record = {
            "file": relative.as_posix(),
            "width": mask.shape[1],
            "height": mask.shape[0],
            "labels_present": present,
            "scores": dict.fromkeys(LABELS, 0.5),
            "model_version": "test",
        }
        record_path(out, relative).parent.mkdir(parents=True, exist_ok=True)
        record_path(out, relative).write_text(json.dumps(record))
        done.append(relative)
    return sorted(done)  # as a run lists its images


def read_with_datumaro(zip_path: Path, tmp: Path) -> tuple[dict, dict[str, np.ndarray]]:
    venv = DATUMARO.installed_or_skip()
    folder = tmp / "cvat-read"
    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(folder)
    target = tmp / "datumaro.npz"
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _DATUMARO_READER, str(folder), str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(target) as arrays:
        masks = {name: arrays[name] for name in arrays.files}
    return json.loads(done.stdout.strip().splitlines()[-1]), masks


def components(mask: np.ndarray) -> dict[str, int]:
    counts = {}
    for index, name in enumerate(LABELS, start=1):
        count, _ = label_components(mask == index)
        if count:
            counts[name] = count
    return counts


# ---------------------------------------------------------------------------- objects
def test_object_mask_numbers_each_component_and_keeps_void():
    mask = shapes_mask()
    objects = object_mask(mask, [1, 2])
    assert set(np.unique(objects[mask == 1]).tolist()) == {1}  # the ring is one object
    assert set(np.unique(objects[mask == 2]).tolist()) == {2, 3, 4}  # three parts
    assert (objects[mask == VOID] == VOID).all()
    assert (objects[mask == 0] == 0).all()
    # the parts are numbered in scan order: the top-right one first
    assert objects[3, 42] == 2 and objects[14, 14] == 3 and objects[32, 32] == 4


def test_objects_found_in_each_labels_box_are_the_images_components():
    # Labels in small boxes of a larger mask, one touching two edges, one diagonal chain (one
    # object under 8-connectivity): each object is exactly one component of its label.
    rng = np.random.default_rng(4)
    mask = np.zeros((300, 400), np.uint8)
    mask[10:40, 350:400] = 1
    mask[250:300, 0:30] = 1
    for k in range(20):
        mask[100 + k, 100 + k] = 2
    mask[rng.integers(0, 300, 200), rng.integers(0, 400, 200)] = 3
    objects = object_mask(mask, [1, 2, 3])
    seen: set[int] = set()
    for label in (1, 2, 3):
        count, parts = label_components(mask == label)
        ids = set()
        for part in range(1, count + 1):
            (found,) = np.unique(objects[parts == part])  # one id for the whole component
            ids.add(int(found))
        assert len(ids) == count and not ids & seen  # one id per component, never shared
        seen |= ids
    assert count > 100 and sorted(seen) == list(range(1, len(seen) + 1))
    assert (objects[mask == 0] == 0).all()


def test_more_objects_than_the_format_holds_share_the_last_id():
    mask = np.zeros((3, 2 * 300), np.uint8)
    mask[1, ::2] = 1  # 300 separate pixels
    objects = object_mask(mask, [1])
    assert objects.max() == 254 and (objects[1, ::2] > 0).all()


# ---------------------------------------------------------------------------- consumers
def test_a_hole_and_three_parts_through_cvat_and_hf(tmp_path):
    """Hand-made masks through both formats: datumaro and datasets give the same ids back,
    one object for the holed ring and three for the label in three parts."""
    import datasets

    out, images = tmp_path / "out", tmp_path / "images"
    mask = shapes_mask()
    masks = {"shapes": mask, "empty": np.zeros((8, 8), np.uint8)}
    done = write_done_images(images, out, masks)
    from exporters import labelmap_text

    zip_path = write_cvat_mask(out, labelmap_text(LABELS), done)
    info, read = read_with_datumaro(zip_path, tmp_path)
    assert info["names"] == ["background", *LABELS]
    expected = mask.copy()
    expected[mask == VOID] = 0  # void is no class in the label map
    np.testing.assert_array_equal(read["shapes"], expected)
    assert info["objects"]["shapes"] == {"ring": 1, "dots": 3}

    write_hf(out, images, LABELS, done)
    dataset = datasets.load_from_disk(str(out / "hf"))["train"]
    assert list(dataset["file_name"]) == ["empty.png", "shapes.png"]
    np.testing.assert_array_equal(np.array(dataset[1]["mask"]), mask)
    names = dataset.features["labels_present"].feature.names
    assert names == ["background", *LABELS]
    assert [names[i] for i in dataset[1]["labels_present"]] == LABELS


@pytest.mark.slow
def test_demo_scenes_through_cvat_and_hf_equal_the_png_masks(tmp_path):
    """The demo scenes labelled to PNG only, then a rerun that adds both formats (made from
    the stored masks, nothing labelled again); each read back by its consumer."""
    import datasets

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((ROOT / "demo" / "scenes" / "images").iterdir())[:6]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "out"
    common = (
        "pseudo-label", str(images), "--labels-file", "demo/scenes/colours.txt",
        "--model", "demo/model", "--image-size", "64", "--background-prompt", "background",
        "--out", str(out),
    )  # fmt: skip
    first = run_cli(*common, "--format", "png")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (out / "objects").exists()
    second = run_cli(*common, "--format", "cvat-mask", "--format", "hf")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already done 6" in second.stderr

    labels = (ROOT / "demo" / "scenes" / "colours.txt").read_text().split()
    pngs = {}
    for path in sorted((out / "masks").glob("*.png")):
        with Image.open(path) as png:
            pngs[path.stem] = png_to_mask(png)
    assert len(pngs) == 6

    info, read = read_with_datumaro(out / "cvat-mask.zip", tmp_path)
    assert info["names"] == ["background", *labels]
    assert sorted(read) == sorted(pngs)
    for name, mask in pngs.items():
        np.testing.assert_array_equal(read[name], mask)
        per_label = {}
        for index, label in enumerate(labels, start=1):
            count, _ = label_components(mask == index)
            if count:
                per_label[label] = count
        assert info["objects"][name] == per_label

    for dataset in (
        datasets.load_from_disk(str(out / "hf"))["train"],
        datasets.load_dataset("parquet", data_dir=str(out / "hf-parquet"), split="train"),
    ):
        assert len(dataset) == 6
        assert dataset.features["labels_present"].feature.names == ["background", *labels]
        for row in dataset:
            stem = Path(row["file_name"]).stem
            np.testing.assert_array_equal(np.array(row["mask"]), pngs[stem])
            with Image.open(images / row["file_name"]) as original:
                assert row["image"].size == original.size


def test_a_missing_extra_fails_at_once_with_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[hf\]"'):
        require_extra("stableseg_no_such_package", "hf", "--format hf")

    from labeler.jobs import dataset_exports

    monkeypatch.setitem(dataset_exports.FORMAT_EXTRAS, "hf", ("stableseg_no_such_package", "hf"))
    from click.testing import CliRunner

    from labeler.commands import main

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    result = CliRunner().invoke(
        main,
        ["pseudo-label", str(images), "--labels", "a", "--model", "demo/model",
         "--image-size", "64", "--format", "hf", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "--format hf needs the 'stableseg_no_such_package' package" in result.output
    assert not (tmp_path / "out").exists()
