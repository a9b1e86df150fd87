"""The pipelined ``pseudo-label``: golden outputs, workers, kills, bounded queues, per-image
labels, prepared images, streamed exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.stand_in import StandInSegmenter
from labeler.images import decode_image
from labeler.jobs.io import list_images
from labeler.jobs.pipeline import WriterPool, ordered_map
from labeler.jobs.pseudo_label import PseudoLabelOptions, run
from labeler.model_settings import SegmenterConfig

from .pipeline_golden import assert_same_outputs, digest_run
from .support import run_cli

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "pseudo_label_demo.json"


def tree(out: Path) -> dict[str, bytes]:
    """Every file of an output folder (run.json aside), by relative path."""
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name != "run.json"
    }


def save_random_images(folder: Path, count: int, shape=(24, 24), seed: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = (rng.random((*shape, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


# ---------------------------------------------------------------------------- golden
def test_demo_scenes_give_the_outputs_of_the_job_before_the_pipeline(tmp_path):
    """Masks, records, COCO, Label Studio, label files and gallery as main's job wrote them
    (tests/pipeline_golden.py says how the golden file was made)."""
    out = tmp_path / "out"
    proc = run_cli(
        "pseudo-label", "demo/scenes/images", "--labels-file", "demo/scenes/colours.txt",
        "--model", "demo/model", "--image-size", "64", "--background-prompt", "background",
        "--format", "coco", "--format", "png", "--format", "labelstudio", "--preview",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_outputs(digest_run(out), json.loads(GOLDEN.read_text()))
    with Image.open(out / "masks" / "scene_000.png") as png:
        assert png.mode == "P"


# ---------------------------------------------------------------------------- workers
@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """JPEGs and PNGs of several sizes and modes, an EXIF-rotated photo, a broken file."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(5)
    (root / "sub").mkdir()
    for i, (height, width) in enumerate([(30, 40), (64, 48), (17, 90), (50, 50), (33, 21)]):
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"photo_{i}.jpg", quality=90)
        Image.fromarray(pixels[..., 0]).save(root / "sub" / f"grey_{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray((rng.random((20, 44, 3)) * 255).astype(np.uint8)).save(
        root / "rotated.jpg", exif=exif
    )
    (root / "broken.jpg").write_bytes((root / "photo_0.jpg").read_bytes()[:150])
    return root


def test_one_and_four_workers_write_identical_files(tmp_path, mixed_folder, tiny_model_dir):
    outs = {}
    for workers in ("1", "4"):
        out = tmp_path / f"w{workers}"
        proc = run_cli(
            "pseudo-label", str(mixed_folder), "--labels", "cat,dog,bird",
            "--model", str(tiny_model_dir), "--image-size", "64", "--batch-size", "3",
            "--format", "coco", "--format", "labelstudio", "--preview",
            "--workers", workers, "--out", str(out),
        )  # fmt: skip
        assert proc.returncode == 3, proc.stderr[-3000:]  # broken.jpg skipped
        assert "labelled 11, skipped 1" in proc.stderr
        outs[workers] = tree(out)
    assert outs["1"].keys() == outs["4"].keys()
    assert len([name for name in outs["1"] if name.startswith("masks/")]) == 11
    for name, data in outs["1"].items():
        assert data == outs["4"][name], name


# ---------------------------------------------------------------------------- kills
def test_kills_at_random_moments_then_a_rerun_lose_and_duplicate_nothing(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    save_random_images(images, 48)
    args = [
        "pseudo-label", str(images), "--labels", "cat,dog", "--model", str(tiny_model_dir),
        "--image-size", "64", "--batch-size", "2", "--workers", "2",
        "--format", "coco", "--format", "labelstudio", "--preview",
    ]  # fmt: skip
    reference = run_cli(*args, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(7)
    kills = 0
    for _ in range(4):  # bounded: each attempt labels some images or finds the run done
        target = int(rng.integers(1, 48))
        delay = float(rng.uniform(0.0, 0.4))
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *args, "--out", str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(list(out.glob("records/*.json")))
            if done >= target:
                break
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the runs must be killed part-way"

    rerun = run_cli(*args, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(out.rglob("*.tmp")), "temporary files left"
    for folder in ("records", "masks", "pieces", "preview"):
        assert len([p for p in (out / folder).rglob("*") if p.is_file()]) == 48 + (
            folder == "preview"  # index.html
        ), folder
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == [f"{i:03d}.png" for i in range(48)]
    ids = [a["id"] for a in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    assert_same_outputs(digest_run(out), digest_run(tmp_path / "reference"))


# ---------------------------------------------------------------------------- bounded
def test_images_read_ahead_of_a_slow_model_stay_bounded(tmp_path):
    images = tmp_path / "images"
    save_random_images(images, 120, shape=(16, 20))
    batch, workers = 4, 2
    model = StandInSegmenter(image_size=64, finish="device", delay=0.02, batch_size=batch)
    options = PseudoLabelOptions(
        images_dir=images,
        out_dir=tmp_path / "out",
        labels=["cat", "dog"],
        segmenter=SegmenterConfig(image_size=64, batch_size=batch),
        workers=workers,
    )
    summary = run(options, model=model)
    assert summary.labelled == 120 and model.calls == 30
    stats = summary.stats
    # Read and not yet through the model: the batch being filled or segmented, and at most
    # batch + readers results ahead of it; never the folder.
    assert batch <= stats.waiting.peak <= 2 * batch + workers
    assert stats.waiting.current == 0
    assert stats.writing.peak <= batch + workers


def test_pool_primitives_keep_order_bound_and_raise():
    started, lock = [], threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        return i * i

    results = ordered_map(work, range(50), workers=3, ahead=5)
    assert next(results) == 0
    time.sleep(0.05)
    assert len(started) <= 6  # the one taken and at most 5 ahead
    assert list(results) == [i * i for i in range(1, 50)]

    def fail(i: int) -> int:
        if i == 7:
            raise RuntimeError("seven")
        return i

    with pytest.raises(RuntimeError, match="seven"):
        list(ordered_map(fail, range(20), workers=2, ahead=3))

    done = []
    with pytest.raises(RuntimeError, match="bad task"):
        with WriterPool(workers=2, max_pending=3) as pool:
            for i in range(10):
                pool.submit(done.append, i)
            pool.submit(lambda: (_ for _ in ()).throw(RuntimeError("bad task")))
    assert sorted(done) == list(range(10))


# ---------------------------------------------------------------------------- per-image labels
def test_labels_from_gt_skips_only_the_image_without_ground_truth(tmp_path, tiny_model):
    from exporters import mask_to_png

    images, gt = tmp_path / "images", tmp_path / "gt"
    gt.mkdir()
    save_random_images(images, 4, shape=(20, 24), seed=3)
    present = {"000": [1], "001": [2, 3], "003": []}  # 002 has no ground truth
    for name, ids in present.items():
        mask = np.zeros((20, 24), np.uint8)
        for i, label_id in enumerate(ids):
            mask[:, i * 8 : i * 8 + 8] = label_id
        mask_to_png(mask).save(gt / f"{name}.png")
    options = PseudoLabelOptions(
        images_dir=images,
        out_dir=tmp_path / "out",
        labels=["cat", "dog", "bird"],
        segmenter=SegmenterConfig(image_size=64, batch_size=2),  # as tiny_model
        labels_from_gt=gt,
        formats=("coco", "png"),
    )
    summary = run(options, model=tiny_model)
    assert summary.labelled == 3
    assert [s.item for s in summary.skipped] == ["002.png"]
    assert "no ground-truth mask" in summary.skipped[0].reason

    def ids(name: str) -> set[int]:
        with Image.open(tmp_path / "out" / "masks" / f"{name}.png") as png:
            return set(np.unique(np.array(png)).tolist())

    assert ids("000") == {1}
    assert ids("001") <= {2, 3}
    assert ids("003") == {0}
    record = json.loads((tmp_path / "out" / "records" / "001.json").read_text())
    assert record["scores"]["cat"] == 0.0 and list(record["scores"]) == ["cat", "dog", "bird"]
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    assert {a["category_id"] for a in coco["annotations"] if a["image_id"] == 1} == {1}


# ---------------------------------------------------------------------------- prepared images
def test_reduced_jpeg_decoding_keeps_the_original_size():
    import io

    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 600 wide, 800 high
    buffer = io.BytesIO()
    Image.new("RGB", (800, 600), (10, 200, 30)).save(buffer, "JPEG", exif=exif)
    image, size = decode_image(buffer.getvalue(), at_least=lambda shown: (100, 100))
    assert size == (600, 800)
    assert image.size == (150, 200)  # 1/4 scale, still >= 100 on both sides, EXIF applied
    full, size = decode_image(buffer.getvalue())
    assert full.size == size == (600, 800)


def test_prepared_images_come_from_reduced_decodes_and_masks_keep_the_original_size(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    exif = Image.Exif()
    exif[0x0112] = 8
    big = (rng.random((900, 1400, 3)) * 255).astype(np.uint8)
    Image.fromarray(big).save(images / "big.jpg", quality=85)
    Image.fromarray(big[:300, :500]).save(images / "turned.jpg", quality=85, exif=exif)

    seen = []

    class Recording(StandInSegmenter):
        def segment(self, images, labels, *, return_probs=False):
            seen.extend(images)
            return super().segment(images, labels, return_probs=return_probs)

    model = Recording(image_size=64, finish="cpu", prepared=True, batch_size=2)
    options = PseudoLabelOptions(
        images_dir=images,
        out_dir=tmp_path / "out",
        labels=["cat", "dog"],
        segmenter=SegmenterConfig(image_size=64, batch_size=2),
        formats=("coco", "png", "labelstudio"),
        preview=True,
    )
    summary = run(options, model=model)
    assert summary.labelled == 2
    assert sorted((item.size, item.pixels.shape) for item in seen) == [
        ((300, 500), (64, 64, 3)),
        ((1400, 900), (64, 64, 3)),
    ]
    with Image.open(tmp_path / "out" / "masks" / "big.png") as png:
        assert png.size == (1400, 900)
    with Image.open(tmp_path / "out" / "masks" / "turned.png") as png:
        assert png.size == (300, 500)  # EXIF orientation 8: shown 300 wide, 500 high
    with Image.open(tmp_path / "out" / "preview" / "big.jpg") as preview:
        # the picture's long side capped at 1024, the legend in a panel beside it
        assert preview.height == 658 and 1024 < preview.width < 1024 + 200
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(1400, 900), (300, 500)]


# ---------------------------------------------------------------------------- exports
def test_streamed_exports_equal_the_documents_built_in_memory(tmp_path):
    """coco.json and labelstudio.json byte for byte as json.dumps of build_coco and
    build_import_file over every mask, with labels that need escaping."""
    from exporters import (
        brush_prediction,
        build_coco,
        build_import_file,
        coco_annotations,
        coco_image,
        image_url,
        import_task,
        png_to_mask,
    )

    images = tmp_path / "images"
    save_random_images(images, 9, shape=(23, 31), seed=4)
    labels = ['ça "va"', "dog/cat", "<b>", "ünï", "x"]
    model = StandInSegmenter(image_size=64, finish="cpu", batch_size=4)
    options = PseudoLabelOptions(
        images_dir=images,
        out_dir=tmp_path / "out",
        labels=labels,
        segmenter=SegmenterConfig(image_size=64, batch_size=4),
        formats=("coco", "png", "labelstudio"),
        image_root_url="http://host/x y/",
    )
    run(options, model=model)
    out = tmp_path / "out"
    coco_images, annotations, tasks = [], [], []
    for relative in list_images(images):
        stem = relative.with_suffix("")
        record = json.loads((out / "records" / f"{stem}.json").read_text())
        with Image.open(out / "masks" / f"{stem}.png") as png:
            mask = png_to_mask(png)
        image_id = len(coco_images) + 1
        coco_images.append(coco_image(image_id, record["file"], record["width"], record["height"]))
        scores = [record["scores"][name] for name in labels]
        annotations += coco_annotations(
            mask, image_id, len(annotations) + 1, len(labels), scores=scores
        )
        pred = brush_prediction(mask, labels, record["scores"], record["model_version"])
        tasks.append(import_task(image_url(options.image_root_url, record["file"]), pred))
    coco = build_coco(coco_images, annotations, labels)
    expected_coco = json.dumps(coco, ensure_ascii=False) + "\n"
    assert (out / "coco.json").read_text() == expected_coco
    expected_ls = json.dumps(build_import_file(tasks), ensure_ascii=False) + "\n"
    assert (out / "labelstudio.json").read_text() == expected_ls
    assert len(coco["annotations"]) > 9  # several labels per image


def test_missing_or_partial_pieces_are_made_again_from_the_masks(tmp_path):
    images = tmp_path / "images"
    save_random_images(images, 6, seed=9)

    def label(out: Path, formats: tuple[str, ...]):
        options = PseudoLabelOptions(
            images_dir=images,
            out_dir=out,
            labels=["cat", "dog", "bird"],
            segmenter=SegmenterConfig(image_size=64, batch_size=4),
            formats=formats,
        )
        model = StandInSegmenter(image_size=64, finish="cpu", batch_size=4)
        return run(options, model=model)

    label(tmp_path / "full", ("coco", "png", "labelstudio"))
    out = tmp_path / "partial"
    label(out, ("coco", "png"))  # no Label Studio pieces
    for path in list((out / "pieces").glob("00[0-2].jsonl")):
        path.unlink()  # as a run of an older version left them
    again = label(out, ("coco", "png", "labelstudio"))
    assert again.already_done == 6 and again.labelled == 0
    for name in ("coco.json", "labelstudio.json"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert len(list((out / "pieces").glob("*.jsonl"))) == 6
