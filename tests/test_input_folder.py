"""What ``pseudo-label`` reads as input: names that are not UTF-8, and its own outputs (or any
other run of this tool) inside the input folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.stand_in import StandInSegmenter
from labeler.jobs.io import Failure, list_images
from labeler.jobs.pseudo_label import PseudoLabelOptions, run
from labeler.model_settings import SegmenterConfig

LABELS = ["red", "green"]


def save_images(folder: Path, names: list[str | bytes]) -> None:
    """Small random RGB PNGs under ``folder``; a bytes name is written as those very bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for name in names:
        pixels = (rng.random((20, 28, 3)) * 255).astype(np.uint8)
        path = Path(folder, os.fsdecode(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            Image.fromarray(pixels).save(handle, format="PNG")


def label(images: Path, out: Path, formats=("coco", "png", "labelstudio")):
    options = PseudoLabelOptions(
        images_dir=images,
        out_dir=out,
        labels=LABELS,
        segmenter=SegmenterConfig(image_size=64, batch_size=2),
        formats=formats,
        preview=True,
        workers=1,
    )
    return run(options, model=StandInSegmenter(image_size=64, finish="cpu", batch_size=2))


def test_a_name_that_is_not_utf8_is_skipped_with_a_reason_and_reruns_work(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    bad = b"caf\xe9 \xff.png"  # Latin-1 bytes: not UTF-8 (Python keeps them as surrogates)
    save_images(images, ["good.png", bad, "sub/also good.png"])
    save_images(images / "sub" / os.fsdecode(b"dir\xfe"), ["inner.png"])
    assert any(os.fsencode(p) == bad for p in os.listdir(images))  # a real such file

    for attempt in range(2):
        summary = label(images, out)
        assert summary.labelled == (2 if attempt == 0 else 0)
        assert summary.exit_code == 3  # some images skipped
        skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
        assert skipped == [
            {"path": "caf\\xe9 \\xff.png", "reason": skipped[0]["reason"]},
            {"path": "sub/dir\\xfe/inner.png", "reason": skipped[0]["reason"]},
        ]
        assert "not valid UTF-8" in skipped[0]["reason"] and "rename" in skipped[0]["reason"]
        coco = json.loads((out / "coco.json").read_text(encoding="utf-8"))
        assert [i["file_name"] for i in coco["images"]] == ["good.png", "sub/also good.png"]
        tasks = json.loads((out / "labelstudio.json").read_text(encoding="utf-8"))
        assert len(tasks) == 2
        masks = sorted(p.relative_to(out / "masks").as_posix() for p in out.rglob("masks/**/*.png"))
        assert masks == ["good.png", "sub/also good.png"]
        for path in out.rglob("*"):  # every output's name is UTF-8
            str(path.relative_to(out)).encode("utf-8")


def test_out_inside_the_input_folder_is_never_read_as_input(tmp_path):
    images = tmp_path / "images"
    save_images(images, ["a.png", "b.png"])
    out = images / "labels"
    for _ in range(3):
        summary = label(images, out)
        assert summary.total == 2 and not summary.skipped
        coco = json.loads((out / "coco.json").read_text())
        assert [i["file_name"] for i in coco["images"]] == ["a.png", "b.png"]
    assert not (out / "masks" / "labels").exists()
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png", "b.png"]


def test_every_run_folder_under_the_input_is_left_out(tmp_path):
    """Another pseudo-label run and a refine work dir inside the folder are recognised by their
    run.json; a folder whose run.json is not ours is read as usual."""
    images = tmp_path / "images"
    save_images(images, ["a.png"])
    label(images, images / "first")  # a finished run inside the folder
    save_images(images / "refine" / "stableseg" / "masks", ["x.png"])
    (images / "refine" / "run.json").write_text(json.dumps({"format": "stableseg-refine/3"}))
    save_images(images / "other", ["c.png"])
    (images / "other" / "run.json").write_text(json.dumps({"format": "someone-else/1"}))
    save_images(images / "broken", ["d.png"])
    (images / "broken" / "run.json").write_text("{not json")
    found = [p.as_posix() for p in list_images(images)]
    assert found == ["a.png", "broken/d.png", "other/c.png"]
    refused: list[Failure] = []
    assert list_images(images, exclude=[images / "other"], refused=refused) == [
        Path("a.png"),
        Path("broken/d.png"),
    ]
    assert refused == []


def test_out_equal_to_the_input_folder_is_refused(tmp_path):
    images = tmp_path / "images"
    save_images(images, ["a.png"])
    with pytest.raises(ValueError, match=r"--out .* is IMAGES_DIR itself"):
        label(images, images / ".")
    assert not (images / "run.json").exists()
