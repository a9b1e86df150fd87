"""``benchmark`` on synthetic datasets in preset layouts, with the tiny model: both protocols,
the scores against a protocol computed here pixel by pixel, sweeps, previews, usage errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from exporters import mask_to_png
from labeler import SegmenterConfig
from labeler.datasets import preset_names
from labeler.jobs.benchmark import (
    NO_CLASS,
    BenchmarkOptions,
    open_benchmark_dataset,
    run_benchmark,
    score_point,
)
from labeler.jobs.sweep import parse_sweep, sweep_points
from labeler.jobs.tables import TABLE1_COLUMNS
from labeler.model_settings import ModelSettings, ModelSpec

from .test_datasets import _image

CAT, DOG, PERSON = 8, 12, 15  # VOC ids
# key -> the VOC classes painted in its ground truth (sorted keys are the dataset's order).
VOC_SCENES = {
    "a_cat_person": (CAT, PERSON),
    "b_cat": (CAT,),
    "c_dog": (DOG,),
    "d_cat_person": (CAT, PERSON),
    "e_background": (),
}


def _voc_gt(classes: tuple[int, ...], height: int = 40, width: int = 48) -> np.ndarray:
    """Background, a 255 border, and one vertical band per class."""
    gt = np.zeros((height, width), np.uint8)
    for index, class_id in enumerate(classes):
        gt[8:32, 4 + 20 * index : 20 + 20 * index] = class_id
    gt[0, :] = 255
    return gt


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """A VOC2012 val split of five scenes, JPEG images and palette PNGs as released."""
    root = tmp_path_factory.mktemp("voc")
    base = root / "VOCdevkit" / "VOC2012"
    for key, classes in VOC_SCENES.items():
        _image(base / "JPEGImages" / f"{key}.jpg", (48, 40))
        path = base / "SegmentationClass" / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        mask_to_png(_voc_gt(classes)).save(path)
    listing = base / "ImageSets" / "Segmentation"
    listing.mkdir(parents=True)
    (listing / "val.txt").write_text("".join(f"{key}\n" for key in VOC_SCENES))
    return root


class Recording:
    """The tiny StableSeg, noting the label list of every ``segment`` call (an observation of
    what the benchmark prompts with; the model runs for real)."""

    def __init__(self, model, calls: list) -> None:
        self.model, self.calls = model, calls

    def with_config(self, config):
        return Recording(self.model.with_config(config), self.calls)

    def segment(self, images, labels, **kwargs):
        self.calls.append((len(images), list(labels)))
        return self.model.segment(images, labels, **kwargs)

    def segment_pending(self, images, labels, **kwargs):  # what the model stage calls
        self.calls.append((len(images), list(labels)))
        return self.model.segment_pending(images, labels, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _settings(model_dir: Path, batch_size: int = 1, **changes) -> ModelSettings:
    config = SegmenterConfig(image_size=64, batch_size=batch_size, **changes)
    return ModelSettings(ModelSpec(str(model_dir), device="cpu"), config)


def _pas20_by_hand(model, root: Path, protocol: str) -> tuple[dict[str, float], float]:
    """Per-class IoU (percent) and mIoU of the PAS-20 protocol, from masks predicted here."""
    from labeler.datasets.classes import VOC

    base = root / "VOCdevkit" / "VOC2012"
    inter, union = np.zeros(21), np.zeros(21)
    for key, classes in VOC_SCENES.items():
        if protocol == "paper" and not classes:
            continue
        ids = list(classes) if protocol == "paper" else list(range(1, 21))
        with Image.open(base / "JPEGImages" / f"{key}.jpg") as image:
            local = model.segment(image.convert("RGB"), [VOC[i - 1] for i in ids])[0].mask
        pred = np.array([0, *ids])[local]  # prompted label k -> VOC id
        gt = np.array(Image.open(base / "SegmentationClass" / f"{key}.png"))
        scored = (gt != 0) & (gt != 255)  # PAS-20: background and borders are not scored
        for c in range(1, 21):
            inter[c] += ((pred == c) & (gt == c) & scored).sum()
            union[c] += (((pred == c) | (gt == c)) & scored).sum()
    per_class = {VOC[c - 1]: 100 * inter[c] / union[c] for c in range(1, 21) if union[c]}
    return per_class, float(np.mean(list(per_class.values())))


@pytest.mark.parametrize("protocol", ["paper", "open"])
def test_voc_scores_by_the_protocol_and_prompts_each_image_with_its_classes(
    protocol, voc_root, tiny_model, tiny_model_dir, tmp_path
) -> None:
    calls: list = []
    settings = _settings(tiny_model_dir, batch_size=2)
    options = BenchmarkOptions("voc", voc_root, tmp_path / "out", settings, protocol=protocol)
    model = tiny_model.with_config(options.settings.segmenter)
    report = run_benchmark(options, model=Recording(model, calls))

    if protocol == "paper":
        # Batches of two: the two cat+person scenes share one; the label sets that never fill
        # a batch go last, once the images run out.
        assert calls == [(2, ["cat", "person"]), (1, ["cat"]), (1, ["dog"])]
        assert report["skipped"] == [{"image": "e_background", "reason": NO_CLASS}]
        assert report["images"] == 4
        assert report["paper"] == {"StableSeg": 50.3, "StableSeg w/o SAR": 47.2}
    else:
        assert [labels for _, labels in calls] == [calls[0][1]] * len(calls)
        assert len(calls[0][1]) == 20 and sum(n for n, _ in calls) == 5
        assert report["skipped"] == [] and report["images"] == 5
        assert report["paper"] == {}

    per_class, miou = _pas20_by_hand(model, voc_root, protocol)
    assert report["mIoU"] == pytest.approx(miou)
    found = {name: value for name, value in report["per_class"].items() if value is not None}
    assert report["per_class"]["background"] is None  # not scored (PAS-20), never predicted
    assert found == pytest.approx(per_class)
    assert report["dataset"]["score_protocol"]["exclude_background"] is True
    assert report["protocol"] == protocol and report["dataset"]["split"] == "val"
    assert report["settings"]["segmenter"]["image_size"] == 64
    assert report["settings"]["model"]["source"] == str(tiny_model_dir)
    assert report["images_per_second"] > 0

    written = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert written == report
    table = (tmp_path / "out" / "table.md").read_text()
    assert table == report["table"]
    header, _, row = table.splitlines()
    assert header == "| Method | " + " | ".join(TABLE1_COLUMNS.values()) + " |"
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["StableSeg", f"{miou:.1f}", "", "", "", "", ""]


def test_preview_rows_are_the_first_scored_images_whatever_order_the_model_gives(
    voc_root, tiny_model, tiny_model_dir, tmp_path
) -> None:
    """With batches of two the two cat+person scenes (samples 0 and 3) come out of the model
    first; the preview rows are still those of the first two scored samples, in order."""
    settings = _settings(tiny_model_dir, batch_size=2)
    dataset = open_benchmark_dataset(BenchmarkOptions("voc", voc_root, tmp_path, settings))
    (point,) = sweep_points(settings.segmenter, ())
    model = tiny_model.with_config(settings.segmenter)
    scored = score_point(dataset, model, point, "paper", previews=2, workers=2)
    assert scored.metrics["images"] == 4 and scored.model_seconds > 0
    truths = [dataset.read_gt(sample) for sample in dataset.samples[:2]]
    assert len(scored.previews) == 2
    for (_, gt, _), truth in zip(scored.previews, truths, strict=True):
        assert np.array_equal(gt, truth)  # 40 px high: rows at full size


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    """Images and grey-PNG masks of one's own: 0 background, 1 cat, 2 dog, 7 a void id."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for index, classes in enumerate([(1,), (1, 2), (2,), ()]):
        name = f"sub/img{index}" if index == 3 else f"img{index}"
        gt = np.zeros((36, 52), np.uint8)
        for k, class_id in enumerate(classes):
            gt[6:30, 4 + 24 * k : 24 + 24 * k] = class_id
        gt[-4:, :] = 7
        (root / "masks" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gt, mode="L").save(root / "masks" / f"{name}.png")
        pixels = rng.integers(0, 256, (36, 52, 3), dtype=np.uint8)
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    return root


def _folder_args(root: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "benchmark",
        "folder",
        "--root",
        str(root / "images"),
        "--gt",
        str(root / "masks"),
        "--labels",
        "cat,dog",
        "--ignore-index",
        "7",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--image-size",
        "64",
        "--background-threshold",
        "0.55",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("protocol", ["paper", "open"])
def test_folder_dataset_through_the_cli(protocol, folder_root, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "out"
    args = _folder_args(folder_root, tiny_model_dir, out, "--protocol", protocol, "--preview", "2")
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0, shown.output
    report = json.loads((out / "benchmark.json").read_text())
    assert report["dataset"]["name"] == "folder" and report["dataset"]["classes"] == ["cat", "dog"]
    assert report["dataset"]["ignore_index"] == [7]  # decoded to 255, not scored
    assert report["dataset"]["score_protocol"]["exclude_background"] is False
    assert report["num_pixels"] == report["images"] * (36 - 4) * 52
    assert set(report["per_class"]) == {"background", "cat", "dog"}
    assert report["settings"]["segmenter"]["background_threshold"] == 0.55
    if protocol == "paper":  # sub/img3 holds only background: no class to prompt it with
        assert report["skipped"] == [{"image": "sub/img3", "reason": NO_CLASS}]
    else:
        assert report["skipped"] == []
    assert report["images"] == (3 if protocol == "paper" else 4)
    header, _, row = report["table"].splitlines()
    assert header.endswith("| FoodSeg103 | folder |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["StableSeg", "", "", "", "", "", "", f"{report['mIoU']:.1f}"]
    assert report["table"] in shown.output  # printed
    with Image.open(out / "preview.png") as strip:
        assert strip.mode == "RGB" and strip.height > 2 * 160
    assert report["preview"] == "preview.png"


def test_a_sweep_loads_the_model_once_and_fills_the_grid(
    folder_root, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    import labeler.jobs.models as models

    loads = []
    real = models.load_stableseg
    monkeypatch.setattr(models, "load_stableseg", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "out"
    args = _folder_args(folder_root, tiny_model_dir, out, "--sweep", "cross=8,16,<=32 self=16,32")
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0, shown.output
    assert len(loads) == 1
    report = json.loads((out / "benchmark.json").read_text())
    sweep = report["sweep"]
    assert sweep["axes"] == {"cross": ["8", "16", "<=32"], "self": ["16", "32"]}
    grid = sweep["grid"]
    assert (grid["rows"], grid["columns"]) == ("cross", "self")
    assert np.array(grid["mIoU"]).shape == (3, 2)
    assert len(sweep["points"]) == 6
    by_values = {(p["values"]["cross"], p["values"]["self"]): p for p in sweep["points"]}
    assert by_values[("<=32", "16")]["segmenter"]["cross_sizes"] == "<=32"
    assert by_values[("16", "32")]["segmenter"]["self_sizes"] == [32]
    assert grid["mIoU"][2][0] == by_values[("<=32", "16")]["mIoU"]
    lines = report["table"].splitlines()
    assert lines[0] == "| cross \\ self | 16 | 32 |" and len(lines) == 5
    assert lines[4].startswith("| <=32 | ")
    assert "mIoU" not in report  # a sweep's figures are per point


def test_one_axis_sweeps_print_a_row(voc_root, tiny_model, tiny_model_dir, tmp_path) -> None:
    settings = _settings(tiny_model_dir)
    base = BenchmarkOptions("voc", voc_root, tmp_path / "a", settings, limit=3)
    model = tiny_model.with_config(settings.segmenter)
    sar = run_benchmark(replace(base, sweep=tuple(parse_sweep(["sar=on,off,self-only"]))), model)
    grid = sar["sweep"]["grid"]
    assert grid["columns"] == "sar" and grid["column_values"] == ["on", "off", "self-only"]
    assert len(grid["mIoU"]) == 3
    modes = [
        (p["segmenter"]["use_sar"], p["segmenter"]["self_only"]) for p in sar["sweep"]["points"]
    ]
    assert modes == [(True, False), (False, False), (True, True)]
    assert [p["method"] for p in sar["sweep"]["points"]] == [
        "StableSeg",
        "StableSeg w/o SAR",
        "StableSeg, SAR map only",
    ]
    # The sar=off point is the plain run without SAR.
    plain = run_benchmark(
        replace(base, out=tmp_path / "b", settings=_settings(tiny_model_dir, use_sar=False)), model
    )
    assert grid["mIoU"][1] == pytest.approx(plain["mIoU"])
    assert plain["table"].splitlines()[2].startswith("| StableSeg w/o SAR | ")
    timesteps = run_benchmark(
        replace(base, out=tmp_path / "c", sweep=tuple(parse_sweep(["timestep=1,200"]))), model
    )
    assert timesteps["table"].splitlines()[0] == "| timestep | 1 | 200 |"
    assert timesteps["table"].splitlines()[2].startswith("| mIoU | ")


def test_usage_errors_come_before_the_model_loads(folder_root, voc_root, tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    model = ["--model", str(tmp_path / "no-such-model"), "--out", str(out)]
    cases = {
        "only for the folder dataset": ["benchmark", "voc", "--root", str(voc_root), "--gt",
                                        str(folder_root), *model],
        "needs --gt": ["benchmark", "folder", "--root", str(folder_root), "--labels", "a", *model],
        "unknown key 'size'": ["benchmark", "voc", "--root", str(voc_root), "--sweep", "size=1",
                               *model],
        "no such folder": ["benchmark", "voc", "--root", str(voc_root), *model],
        "no PASCAL VOC 2012": ["benchmark", "voc", "--root", str(folder_root), *model],
        "has no split 'test'": ["benchmark", "voc", "--root", str(voc_root), "--split", "test",
                                *model],
    }  # fmt: skip
    for message, args in cases.items():
        shown = runner.invoke(main, args)
        assert shown.exit_code == 2 and message in shown.output, (message, shown.output)
    assert not out.exists()


def test_help_lists_every_option_and_the_presets() -> None:
    from labeler.commands.benchmark import DATASETS

    assert list(DATASETS) == preset_names()
    shown = CliRunner().invoke(main, ["benchmark", "--help"])
    assert shown.exit_code == 0
    for option in ("--protocol", "--sweep", "--preview", "--cross-sizes", "--self-sizes",
                   "--timestep", "--sar / --no-sar", "--self-only", "--weights", "--gt",
                   "--ignore-index", "--limit", "--split"):  # fmt: skip
        assert option in shown.output, option
