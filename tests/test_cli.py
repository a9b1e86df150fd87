"""The real `cli.py` commands, run as subprocesses on generated folders with the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from exporters import decode_brush_result, png_to_mask
from labeler.commands import COMMANDS
from labeler.model_settings import ModelSettings
from labeler.settings import settings_of

from .support import run_cli

ROOT = Path(__file__).resolve().parents[1]
LABELS = "cat,dog"


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "P"
        return png_to_mask(image)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Nested folders, odd modes, an EXIF-rotated photo, a broken and an empty file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(root / "rgb.jpg")
    Image.fromarray((rng.random((21, 35)) * 255).astype(np.uint8), "L").save(
        root / "nested/grey.png"
    )
    Image.new("RGBA", (33, 19), (200, 10, 10, 128)).save(root / "nested/alpha.png")
    Image.new("CMYK", (26, 18), (0, 200, 10, 0)).save(root / "nested/deeper/cmyk.tif")
    Image.fromarray(np.full((17, 23), 50000, np.uint16)).save(root / "nested/deeper/sixteen.png")
    rotated = Image.fromarray((rng.random((20, 44, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "rotated.jpg", exif=exif)
    (root / "empty.png").write_bytes(b"")
    (root / "broken.jpg").write_bytes((root / "rgb.jpg").read_bytes()[:200])
    (root / "readme.txt").write_text("not an image")
    return root


GOOD = {  # relative path -> (height, width) as a viewer shows it
    "rgb.jpg": (30, 40),
    "rotated.jpg": (44, 20),
    "nested/grey.png": (21, 35),
    "nested/alpha.png": (19, 33),
    "nested/deeper/cmyk.tif": (18, 26),
    "nested/deeper/sixteen.png": (17, 23),
}


def full_run_args(image_folder: Path, model_dir: Path, out: Path) -> list[str]:
    """pseudo-label with every export and previews, as the module's main run uses it."""
    return [
        "pseudo-label", str(image_folder), "--labels", LABELS, "--model", str(model_dir),
        "--image-size", "64", "--out", str(out), "--format", "coco", "--format", "labelstudio",
        "--preview", "--image-root-url", "/data/local-files/?d=imgs",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def labelled(
    tmp_path_factory, image_folder, tiny_model_dir
) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("out")
    proc = run_cli(*full_run_args(image_folder, tiny_model_dir, out))
    return out, proc


def test_pseudo_label_writes_every_output_and_skips_bad_files(labelled):
    out, proc = labelled
    assert proc.returncode == 3, proc.stderr  # some files were skipped
    assert "labelled 6, skipped 2" in proc.stderr
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["path"] for s in skipped} == {"broken.jpg", "empty.png"}
    assert all(s["reason"] for s in skipped)
    for relative, shape in GOOD.items():
        mask = read_mask(out / "masks" / Path(relative).with_suffix(".png"))
        assert mask.shape == shape, relative  # EXIF applied: the rotated photo is 44 x 20
        assert set(np.unique(mask)) <= {1, 2}
        assert (out / "preview" / Path(relative).with_suffix(".jpg")).exists()
    assert "rotated.jpg" in (out / "preview" / "index.html").read_text()
    classes = json.loads((out / "classes.json").read_text())
    assert classes["1"] == "cat" and classes["2"] == "dog"


def test_coco_decodes_to_exactly_the_png_masks(labelled):
    from pycocotools import mask as mask_api
    from pycocotools.coco import COCO

    out, _ = labelled
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog"]
    images = coco.loadImgs(coco.getImgIds())
    assert sorted(i["file_name"] for i in images) == sorted(GOOD)
    for info in images:
        png = read_mask(out / "masks" / Path(info["file_name"]).with_suffix(".png"))
        assert (info["height"], info["width"]) == png.shape
        rebuilt = np.zeros_like(png)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])):
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["iscrowd"] == 0 and 0 <= ann["score"] <= 1
            binary = mask_api.decode(
                {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
            )
            assert ann["area"] == int(binary.sum())
            rebuilt[binary.astype(bool)] = ann["category_id"]
        np.testing.assert_array_equal(rebuilt, png)


def test_labelstudio_file_decodes_to_the_png_masks(labelled):
    out, _ = labelled
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert len(tasks) == len(GOOD)
    for task in tasks:
        url = task["data"]["image"]
        assert url.startswith("/data/local-files/?d=imgs/")
        relative = url.removeprefix("/data/local-files/?d=imgs/")
        png = read_mask(out / "masks" / Path(relative).with_suffix(".png"))
        (pred,) = task["predictions"]
        assert pred["model_version"].startswith("stableseg-")
        rebuilt = np.zeros_like(png)
        for result in pred["result"]:
            assert result["type"] == "brushlabels"
            assert (result["original_height"], result["original_width"]) == png.shape
            label = result["value"]["brushlabels"][0]
            rebuilt[decode_brush_result(result)] = LABELS.split(",").index(label) + 1
        np.testing.assert_array_equal(rebuilt, png)


def test_rerun_labels_nothing_and_rebuilds_identical_exports(
    labelled, image_folder, tiny_model_dir
):
    out, _ = labelled
    before = {name: (out / name).read_text() for name in ("coco.json", "labelstudio.json")}
    proc = run_cli(*full_run_args(image_folder, tiny_model_dir, out))
    assert proc.returncode == 3
    assert "labelled 0, skipped 2, already done 6" in proc.stderr
    for name, text in before.items():
        assert (out / name).read_text() == text


def test_other_settings_in_the_same_out_dir_are_refused(labelled, image_folder, tiny_model_dir):
    out, _ = labelled
    proc = run_cli(
        "pseudo-label",
        str(image_folder),
        "--labels",
        "cat,dog,bird",
        "--model",
        str(tiny_model_dir),
        "--image-size",
        "64",
        "--out",
        str(out),
    )
    assert proc.returncode == 2
    assert "other settings" in proc.stderr and "--overwrite" in proc.stderr
    # Synonyms change the masks too: the same labels with one more name are another run.
    args = full_run_args(image_folder, tiny_model_dir, out)
    first, rest = LABELS.split(",", 1)
    args[args.index(LABELS)] = f"{first}|kitty,{rest}"
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "other settings" in proc.stderr and "synonyms" in proc.stderr


def test_resume_after_a_kill_loses_and_duplicates_nothing(tmp_path, tiny_model_dir):
    images = tmp_path / "many"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(
            images / f"{i:03d}.png"
        )
    out = tmp_path / "out"
    args = [
        "pseudo-label",
        str(images),
        "--labels",
        LABELS,
        "--model",
        str(tiny_model_dir),
        "--image-size",
        "64",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--format",
        "coco",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = len(list((out / "records").glob("*.json"))) if (out / "records").exists() else 0
        if done >= 4 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(list((out / "records").glob("*.json")))
    assert 4 <= first < 40, "the run must be killed part-way"
    # What a kill between a temporary file's creation and its rename leaves (the window is
    # the fsync, long on slow disks): the rerun must not count it, and removes it.
    (out / "records" / ".005.json.k1lled.tmp").write_text('{"partial')
    (out / "masks").mkdir(exist_ok=True)
    (out / "masks" / ".005.png.k1lled.tmp").write_bytes(b"\x89PNG")

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"already done {first}" in rerun.stderr
    assert len(list((out / "records").glob("*.json"))) == 40
    assert not list(out.rglob("*.tmp"))
    coco = json.loads((out / "coco.json").read_text())
    names = [image["file_name"] for image in coco["images"]]
    assert sorted(names) == [f"{i:03d}.png" for i in range(40)]
    ids = [a["id"] for a in coco["annotations"]]
    assert len(ids) == len(set(ids))


def test_two_processes_under_torchrun_match_one(tmp_path, image_folder, tiny_model_dir, labelled):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "cli.py"),
            "pseudo-label",
            str(image_folder),
            "--labels",
            LABELS,
            "--model",
            str(tiny_model_dir),
            "--image-size",
            "64",
            "--out",
            str(out),
            "--format",
            "coco",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env=env,
    )
    # Exit 3 (some skipped) from process 0 makes torchrun fail too; the outputs are what count.
    assert "labelled 6, skipped 2" in proc.stderr, proc.stderr[-3000:]
    single, _ = labelled
    for relative in GOOD:
        mask = Path(relative).with_suffix(".png")
        np.testing.assert_array_equal(
            read_mask(out / "masks" / mask), read_mask(single / "masks" / mask)
        )
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(GOOD)
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 2


def _save(path: Path, mask: np.ndarray) -> None:
    from exporters import mask_to_png

    path.parent.mkdir(parents=True, exist_ok=True)
    mask_to_png(mask).save(path)


def test_evaluate_on_hand_made_masks(tmp_path):
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 255, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 2, 1], [2, 2, 0, 0]], np.uint8)
    # background: tp 3, fp 0 (pred 0 at 255 ignored), fn 1 -> 3/4
    # cat: tp 4, fp 2, fn 0 -> 4/6; dog: tp 5, fp 0, fn 1 -> 5/6
    _save(tmp_path / "gt" / "a" / "x.png", gt)
    _save(tmp_path / "pred" / "a" / "x.png", pred)
    _save(tmp_path / "gt" / "missing.png", gt)
    _save(tmp_path / "gt" / "small.png", gt)
    _save(tmp_path / "pred" / "small.png", gt[:2])
    report = tmp_path / "report.json"
    result = run_cli(
        "evaluate",
        str(tmp_path / "pred"),
        str(tmp_path / "gt"),
        "--labels",
        "cat,dog",
        "--json",
        str(report),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(report.read_text())
    assert figures["per_class"] == pytest.approx(
        {"background": 75.0, "cat": 400 / 6, "dog": 500 / 6}
    )
    assert figures["mIoU"] == pytest.approx((75.0 + 400 / 6 + 500 / 6) / 3)
    assert figures["pixel_accuracy"] == pytest.approx(100 * 12 / 14)
    assert figures["images_evaluated"] == 1
    reasons = {s["path"]: s["reason"] for s in figures["skipped"]}
    assert "no prediction" in reasons["missing.png"] and "size mismatch" in reasons["small.png"]
    assert "mIoU" in result.stdout and "cat" in result.stdout

    no_bg = run_cli(
        "evaluate",
        str(tmp_path / "pred"),
        str(tmp_path / "gt"),
        "--labels",
        "cat,dog",
        "--exclude-background",
        "--json",
        str(report),
    )
    assert no_bg.returncode == 0
    # Ground-truth background is not scored: its pixel predicted cat is no false positive.
    # cat: tp 4, fp 1 (the dog pixel) -> 4/5; dog: tp 5, fn 1 -> 5/6.
    assert json.loads(report.read_text())["mIoU"] == pytest.approx((80.0 + 500 / 6) / 2)


def test_evaluate_protocol_options(tmp_path):
    """--exclude-background ignores ground-truth background; --ignore-index is repeatable."""
    # The toy case: half background, half cat, everything predicted cat.
    _save(tmp_path / "gt" / "toy.png", np.array([[0, 0], [1, 1]], np.uint8))
    _save(tmp_path / "pred" / "toy.png", np.ones((2, 2), np.uint8))
    runner = CliRunner()
    args = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", "cat"]
    figures = {}
    for name, extra in (("default", []), ("protocol", ["--exclude-background"])):
        report = tmp_path / f"{name}.json"
        result = runner.invoke(cli.main, [*args, *extra, "--json", str(report)])
        assert result.exit_code == 0, result.output
        figures[name] = json.loads(report.read_text())
    assert figures["default"]["mIoU"] == pytest.approx(25.0)
    assert figures["protocol"]["mIoU"] == pytest.approx(100.0)
    assert figures["protocol"]["protocol"] == {
        "ignore_index": [255],
        "exclude_background": True,
        "pred_ignore": "skip",
    }
    assert figures["protocol"]["images_evaluated"] == 1 and figures["protocol"]["skipped"] == []

    # Two more ignored ground-truth ids; a predicted 255 skipped or counted as a miss.
    _save(tmp_path / "gt" / "toy.png", np.array([[7, 9, 1], [1, 2, 2]], np.uint8))
    _save(tmp_path / "pred" / "toy.png", np.array([[1, 1, 1], [255, 2, 1]], np.uint8))
    base = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", "cat,dog"]
    report = tmp_path / "ignore.json"
    ignore = ["--ignore-index", "7", "--ignore-index", "9", "--json", str(report)]
    result = runner.invoke(cli.main, [*base, *ignore])
    assert result.exit_code == 0, result.output
    skip = json.loads(report.read_text())
    # Scored: cat -> cat, dog -> dog, dog -> cat (the predicted 255 is left out).
    assert skip["per_class"] == pytest.approx({"background": None, "cat": 50.0, "dog": 50.0})
    assert skip["num_pixels"] == 3 and skip["abstained_pixels"] == 1
    assert skip["protocol"]["ignore_index"] == [7, 9, 255]
    result = runner.invoke(cli.main, [*base, *ignore, "--pred-ignore", "miss"])
    assert result.exit_code == 0, result.output
    miss = json.loads(report.read_text())
    assert miss["per_class"]["cat"] == pytest.approx(100 / 3)  # tp 1, gt 2, pred 2
    assert miss["num_pixels"] == 4
    assert "protocol        ignored ground truth 7, 9, 255" in result.output
    # Without --ignore-index, 7 and 9 are ids outside the labels: the image is skipped.
    result = runner.invoke(cli.main, base)
    assert result.exit_code == 1 and "gt holds ids [7, 9]" in result.output


def test_evaluate_help_states_the_protocol():
    result = CliRunner().invoke(cli.main, ["evaluate", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--ignore-index" in text and "--pred-ignore" in text
    assert "with --exclude-background, when it is 0" in text
    assert "mIoU 25.0 by default (background 0, cat 50); 100.0 with --exclude-background" in text


def test_evaluate_with_nothing_to_compare_is_an_error(tmp_path):
    _save(tmp_path / "gt" / "x.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "pred").mkdir()
    result = run_cli("evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", "cat")
    assert result.returncode == 1 and "no mask could be evaluated" in result.stderr


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_every_help_works(command):
    result = CliRunner().invoke(cli.main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output


@pytest.mark.parametrize(
    "command",
    [["pseudo-label"], ["refine"], ["serve"], ["benchmark"], ["label-studio", "predict"]],
)
def test_every_command_that_runs_stableseg_lists_every_segmenter_option(command):
    result = CliRunner().invoke(cli.main, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    missing = [s.flag for s in settings_of(ModelSettings) if s.flag not in result.output]
    assert missing == []


def test_top_level_help_does_not_import_torch():
    code = (
        "import sys, cli; from click.testing import CliRunner; "
        "r = CliRunner().invoke(cli.main, ['--help']); "
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.split() == ["0", "False"], proc.stderr


def test_no_command_help_imports_torch():
    """Each command's options are generated from declarations that import no torch."""
    code = (
        "import sys, time, cli\n"
        "from click.testing import CliRunner\n"
        "from labeler.commands import COMMANDS\n"
        "started = time.monotonic()\n"
        "for name in [*COMMANDS, 'label-studio predict']:\n"
        "    result = CliRunner().invoke(cli.main, [*name.split(), '--help'])\n"
        "    assert result.exit_code == 0, result.output\n"
        "print('torch' in sys.modules, time.monotonic() - started)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    imported, seconds = proc.stdout.split()
    assert imported == "False", proc.stderr
    assert float(seconds) < 10


def test_label_arguments_are_checked(image_folder, tmp_path):
    neither = run_cli("pseudo-label", str(image_folder), "--out", str(tmp_path / "o"))
    assert neither.returncode == 2 and "exactly one of --labels or --labels-file" in neither.stderr
    dup = run_cli("pseudo-label", str(image_folder), "--labels", "cat,cat", "--out", str(tmp_path))
    assert dup.returncode == 2 and "duplicate label 'cat'" in dup.stderr


def test_crf_and_labels_from_gt(tmp_path, tiny_model_dir):
    images, gt = tmp_path / "images", tmp_path / "gt"
    rng = np.random.default_rng(3)
    for name, present in [("a", [1]), ("b", [2, 3]), ("c", [])]:
        pixels = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
        images.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(images / f"{name}.png")
        mask = np.zeros((20, 24), np.uint8)
        for i, label_id in enumerate(present):
            mask[:, i * 8 : i * 8 + 8] = label_id
        _save(gt / f"{name}.png", mask)
    out = tmp_path / "out"
    proc = run_cli(
        "pseudo-label",
        str(images),
        "--labels",
        "cat,dog,bird",
        "--model",
        str(tiny_model_dir),
        "--image-size",
        "64",
        "--out",
        str(out),
        "--crf",
        "--labels-from-gt",
        str(gt),
    )
    assert proc.returncode == 0, proc.stderr
    # Each image only holds labels of its ground truth (ids stay global); none -> background.
    assert set(np.unique(read_mask(out / "masks" / "a.png"))) == {1}
    assert set(np.unique(read_mask(out / "masks" / "b.png"))) <= {2, 3}
    assert set(np.unique(read_mask(out / "masks" / "c.png"))) == {0}
    run = json.loads((out / "run.json").read_text())
    assert run["crf"] is True and run["labels_from_gt"] == str(gt)
