"""Image discovery, loading errors and atomic writes."""

import json

import numpy as np
import pytest
from PIL import Image

from labeler.images import ImageError, open_image
from labeler.jobs.io import (
    atomic_write_json,
    list_images,
    read_jsonl,
    remove_stale_temporaries,
    write_jsonl,
)


def test_list_images_is_recursive_sorted_and_filtered(tmp_path):
    for name in [
        "b.png",
        "a/z.JPG",
        "a/b/c.tiff",
        "x.webp",
        "y.bmp",
        "notes.txt",
        ".hidden.png",
        ".cache/d.png",
        "e.jpeg",
        "f.tif",
    ]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = [p.as_posix() for p in list_images(tmp_path)]
    assert found == ["a/b/c.tiff", "a/z.JPG", "b.png", "e.jpeg", "f.tif", "x.webp", "y.bmp"]


def test_open_image_reports_why_a_file_is_unusable(tmp_path):
    good = tmp_path / "good.png"
    noise = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(good)  # incompressible, so cutting it loses pixel data
    assert open_image(good).size == (30, 20)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:900])
    with pytest.raises(ImageError, match="empty"):
        open_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="not an image"):
        open_image(tmp_path / "text.png")
    with pytest.raises(ImageError, match="truncated"):
        open_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="600 pixels, more than the limit of 500"):
        open_image(good, max_pixels=500)
    with pytest.raises(ImageError, match="cannot read"):
        open_image(tmp_path / "missing.png")
    assert open_image(good.read_bytes()).size == (30, 20)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :5] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=100)
    shown = np.asarray(open_image(tmp_path / "r.jpg"))
    assert shown.shape[:2] == (30, 10)
    assert shown[:5].mean() > 200 and shown[-5:].mean() < 50  # the band is now on top


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "deep" / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    keep = ["a.json", "sub/b.png", ".hidden", "c.tmp", "sub/.d.png"]
    stale = [".a.json.x1y2.tmp", "sub/deeper/.b.png.z9.tmp", "sub/.hf.k3.tmpdir/data.arrow"]
    for name in keep + stale:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / ".folder.tmp").mkdir()  # a folder is not a writer's temporary file

    removed = remove_stale_temporaries(tmp_path)

    removed_names = sorted(p.relative_to(tmp_path).as_posix() for p in removed)
    assert removed_names == sorted([*stale[:2], "sub/.hf.k3.tmpdir"])  # the folder, whole
    left = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert left == set(keep)
    assert (tmp_path / ".folder.tmp").is_dir()


def test_jsonl_round_trip_and_a_torn_last_line(tmp_path):
    path = tmp_path / "s.jsonl"
    write_jsonl(path, [{"path": "a", "reason": "x"}, {"path": "b", "reason": "y"}])
    with path.open("a") as handle:
        handle.write('{"path": "c", "rea')  # a writer killed mid-line
    assert [r["path"] for r in read_jsonl(path)] == ["a", "b"]
    assert list(read_jsonl(tmp_path / "none.jsonl")) == []
