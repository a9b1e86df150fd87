"""refine end to end on ten tiny scenes with the tiny model: every output exists and loads."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from exporters.png import png_to_mask
from labeler import SegmenterConfig, StableSeg, load_map_weights
from labeler.jobs.refine import RefineMismatchError, run_refine
from labeler.result import share_key
from labeler.train.cache import maps_from_bytes
from labeler.train.student import load_student, student_segment

from .refine_helpers import LABELS, fast_options, make_pool, one_thread  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

MASK_FOLDERS = (
    "stableseg/masks",
    "plus/pseudo",
    "plus/pred",
    "plusplus/stableseg",
    "plusplus/pseudo",
    "plusplus/pred",
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """(work dir, pool folder, options, result) of one complete run with --val-gt."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("refine-e2e")
    images, truth = make_pool(root)
    options = fast_options(tiny_model_dir, val_gt=truth)
    started = time.monotonic()
    result = run_refine(images, root / "W", options)
    seconds = time.monotonic() - started
    torch.set_num_threads(before)
    return root / "W", images, options, result, seconds


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return png_to_mask(image)


def test_every_output_exists(finished) -> None:
    work, images, _, result, _ = finished
    assert not result.already_done
    for name in ("run.json", "plan.json", "state.json", "report.json", "report.png"):
        assert (work / name).is_file(), name
    assert (work / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((work / "cache").glob("*.safetensors"))) == 10
    for folder in MASK_FOLDERS:
        assert len(list((work / folder).glob("*.png"))) == 10, folder
    for stage in ("plus", "plusplus"):
        assert (work / stage / "student" / "model.safetensors").is_file()
        assert not (work / stage / "checkpoint.pt").exists()  # removed once the step is done
    assert (work / "plusplus" / "weights.safetensors").is_file()
    assert (work / "plusplus" / "weights.json").is_file()
    # Predictions come back at the image's size with the project's ids.
    with Image.open(images / "scene03.png") as image:
        size = image.size
    pred = _mask(work / "plus" / "pred" / "scene03.png")
    assert (pred.shape[1], pred.shape[0]) == size
    assert set(np.unique(pred)) <= {1, 2}
    assert set(np.unique(_mask(work / "plus" / "pseudo" / "scene03.png"))) <= {1, 2, 255}


def test_the_cache_holds_every_attention_layer(finished, tiny_model) -> None:
    work = finished[0]
    maps, info = maps_from_bytes((work / "cache" / "scene00.safetensors").read_bytes())
    layers = {layer.name: layer for layer in tiny_model.attention_layers()}
    shares = {share_key(name): layer for name, layer in layers.items() if layer.kind == "cross"}
    assert set(maps) == set(layers) | set(shares)
    for name, layer_map in maps.items():
        channels = 1 if name in shares else len(LABELS)  # a cross layer's label share: one map
        assert layer_map.shape == (channels, *{**layers, **shares}[name].size)
        assert layer_map.dtype == np.float16
    assert info["labels"] == list(LABELS)


def test_students_load_with_smp_and_label_images(finished) -> None:
    import segmentation_models_pytorch as smp

    work, images, _, _, _ = finished
    for stage in ("plus", "plusplus"):
        model = smp.from_pretrained(str(work / stage / "student"))
        assert type(model).__name__ == "DeepLabV3Plus"
        assert model.segmentation_head[0].out_channels == len(LABELS) + 1
    student = load_student(work / "plusplus" / "student", device="cpu")
    assert student.labels == list(LABELS) and not student.background
    with Image.open(images / "scene01.png") as image:
        result = student_segment(student, image.copy(), list(LABELS))[0]
    assert result.mask.shape == (image.height, image.width)
    np.testing.assert_array_equal(result.mask, _mask(work / "plusplus" / "pred" / "scene01.png"))


def test_stableseg_loads_the_learned_weights(finished, tiny_model_dir) -> None:
    work, images, _, _, _ = finished
    weights = load_map_weights(work / "plusplus" / "weights.safetensors")
    summary = json.loads((work / "plusplus" / "weights.json").read_text())
    assert set(weights) == set(summary["cross"]) | set(summary["self"])
    assert all(w > 0 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(sum(summary["initial"].values()), rel=1e-4)
    config = SegmenterConfig(image_size=64, map_weights=weights)
    segmenter = StableSeg.from_pretrained(tiny_model_dir, device="cpu", config=config)
    with Image.open(images / "scene02.png") as image:
        result = segmenter.segment(image.copy(), list(LABELS))[0]
    assert set(np.unique(result.mask)) <= {1, 2}
    # StableSeg++ masks come from StableSeg run with the learned weights (--plusplus-masks exact).
    exact = _mask(work / "plusplus" / "stableseg" / "scene02.png")
    np.testing.assert_array_equal(exact, result.mask)


def test_report_schema(finished) -> None:
    work, _, options, result, _ = finished
    report = json.loads((work / "report.json").read_text())
    assert report == result.report
    assert report["format"] == "stableseg-refine-report/1" and report["finished"]
    assert report["labels"] == list(LABELS) and report["background"] is False
    assert set(report["stages"]) == {"stableseg", "plus", "plusplus"}
    for name, stage in report["stages"].items():
        assert stage["ran"] and stage["seconds"] > 0, name
        assert 0 <= report["mIoU"][name] <= 100, name
    plus, plusplus = report["stages"]["plus"], report["stages"]["plusplus"]
    assert len(plus["train"]["step_loss"]) == 2 and plus["train"]["epochs"] == 1  # 10 imgs / 4
    assert 0 <= plus["pseudo"]["ignored_fraction"] < 1
    assert plus["pseudo"]["metrics"]["pseudo_masks"]["images"] == 10
    assert len(plusplus["fit"]["loss"]) == options.map_fit.steps
    assert plusplus["fit"]["final_loss"] <= plusplus["fit"]["initial_loss"]
    assert set(plusplus["weights"]) == set(plusplus["initial_weights"])
    assert plusplus["pseudo"]["metrics"]["stableseg"]["mIoU"] is not None
    assert report["stages"]["stableseg"]["skipped"] == {}


def test_a_finished_run_returns_at_once(finished) -> None:
    work, images, options, _, seconds = finished
    started = time.monotonic()
    again = run_refine(images, work, options)
    assert again.already_done
    assert time.monotonic() - started < min(2.0, seconds / 3)
    assert again.weights_path == work / "plusplus" / "weights.safetensors"
    with pytest.raises(RefineMismatchError, match="other settings"):
        run_refine(images, work, replace(options, labels=("dog", "cat")))


def test_background_threshold_makes_background_a_class(tmp_path, tiny_model_dir) -> None:
    images, _ = make_pool(tmp_path, count=4, seed=1)
    # The random model's evidence (each label's attention over its peak) sits around 0.9: a
    # threshold at its median makes about half of every image background.
    segmenter = SegmenterConfig(image_size=64, batch_size=4, background_threshold=0.91)
    options = fast_options(tiny_model_dir, stages=("plus",), segmenter=segmenter)
    result = run_refine(images, tmp_path / "W", options)
    assert set(result.report["stages"]) == {"stableseg", "plus"}
    assert result.weights_path is None and result.report["background"] is True
    ids = set()
    for path in (tmp_path / "W" / "plus" / "pseudo").glob("*.png"):
        ids |= set(np.unique(_mask(path)).tolist())
    assert 0 in ids and ids <= {0, 1, 2, 255}
    assert load_student(tmp_path / "W" / "plus" / "student").background


def test_cli_help_and_usage_errors(tmp_path) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["refine", "--help"])
    assert shown.exit_code == 0
    for option in ("--work-dir", "--stages", "--crf / --no-crf", "--encoder-weights", "--val-gt"):
        assert option in shown.output
    images, _ = make_pool(tmp_path, count=2)
    args = ["refine", str(images), "--labels", "cat,dog", "--work-dir", str(tmp_path / "W")]
    bad = runner.invoke(main, [*args, "--stages", "plus,extra"])
    assert bad.exit_code == 2 and "unknown stage" in bad.output
    odd = runner.invoke(main, [*args, "--crop-size", "100"])
    assert odd.exit_code == 2 and "multiple of 32" in odd.output
    assert not (tmp_path / "W").exists()


def test_stage_one_alone(tmp_path, tiny_model_dir) -> None:
    images, _ = make_pool(tmp_path, count=3, seed=2)
    result = run_refine(images, tmp_path / "W", fast_options(tiny_model_dir, stages=("stableseg",)))
    assert set(result.report["stages"]) == {"stableseg"} and result.report["finished"]
    assert len(list((tmp_path / "W" / "cache").glob("*.safetensors"))) == 3
    assert not (tmp_path / "W" / "plus").exists()
    with pytest.raises(ValueError, match="needs the StableSeg\\+ predictions"):
        run_refine(images, tmp_path / "W", fast_options(tiny_model_dir, stages=("plusplus",)))


def test_unreadable_images_are_reported_and_retried_until_stage_one_is_done(
    tmp_path, tiny_model_dir
) -> None:
    images, _ = make_pool(tmp_path, count=3, seed=4)
    (images / "broken.png").write_bytes(b"")
    options = fast_options(tiny_model_dir, stages=("stableseg",))
    first = run_refine(images, tmp_path / "W", options)
    skipped = first.report["stages"]["stableseg"]["skipped"]
    broken = str(images / "broken.png")
    assert list(skipped) == [broken] and skipped[broken]
    assert first.report["stages"]["stableseg"]["images"] == 3

    # As if the run had been killed before stage 1 was recorded, and the file fixed meanwhile.
    state_file = tmp_path / "W" / "state.json"
    state = json.loads(state_file.read_text())
    del state["steps"]["stableseg"]
    state_file.write_text(json.dumps(state))
    shutil.copy(images / "scene00.png", images / "broken.png")
    second = run_refine(images, tmp_path / "W", options)
    assert second.report["stages"]["stableseg"]["skipped"] == {}
    assert second.report["stages"]["stableseg"]["images"] == 4
    assert (tmp_path / "W" / "cache" / "broken.safetensors").exists()
    assert not (tmp_path / "W" / "cache" / "broken.skip").exists()


def test_an_image_that_fails_to_segment_is_skipped_with_the_reason(
    tmp_path, tiny_model_dir, monkeypatch
) -> None:
    """Its batch is retried image by image (the model stage): the others still get their cache."""
    images, _ = make_pool(tmp_path, count=3, seed=4)
    Image.new("RGB", (33, 77), "red").save(images / "odd.png")
    segment = StableSeg.segment_pending  # what the model stage calls

    def failing(self, inputs, labels, **kwargs):
        if any(tuple(image.size) == (33, 77) for image in inputs):
            raise ValueError("no mask for a 33 x 77 image")
        return segment(self, inputs, labels, **kwargs)

    monkeypatch.setattr(StableSeg, "segment_pending", failing)
    result = run_refine(images, tmp_path / "W", fast_options(tiny_model_dir, stages=()))
    odd = str(images / "odd.png")
    assert result.report["stages"]["stableseg"]["skipped"] == {
        odd: "segmentation failed: no mask for a 33 x 77 image"
    }
    assert result.report["stages"]["stableseg"]["images"] == 3
    assert len(list((tmp_path / "W" / "cache").glob("*.safetensors"))) == 3


def test_val_gt_given_to_a_finished_run_scores_it_without_rerunning(tmp_path, tiny_model_dir):
    images, truth = make_pool(tmp_path, count=4, seed=3)
    options = fast_options(tiny_model_dir, stages=("plus",))
    first = run_refine(images, tmp_path / "W", options)
    assert first.report["mIoU"]["plus"] is None

    events: list[str] = []
    scored = run_refine(images, tmp_path / "W", replace(options, val_gt=truth), events.append)
    assert scored.already_done and events == []  # nothing ran again
    stages = scored.report["stages"]
    assert stages["stableseg"]["metrics"]["images"] == 4
    assert stages["plus"]["pseudo"]["metrics"]["pseudo_masks"]["images"] == 4
    for name in ("stableseg", "plus"):
        assert 0 <= scored.report["mIoU"][name] <= 100
    assert json.loads((tmp_path / "W" / "report.json").read_text()) == scored.report

    again = run_refine(images, tmp_path / "W", replace(options, val_gt=truth))
    assert again.already_done and again.report == scored.report


def test_pseudo_label_uses_the_refine_outputs(finished, tiny_model_dir, tmp_path) -> None:
    """`pseudo-label --student` labels like the student; `--weights` loads the learned weights."""
    from .support import run_cli
    from .test_cli import read_mask

    work, images, _, _, _ = finished
    out = tmp_path / "student"
    proc = run_cli(
        "pseudo-label",
        str(images),
        "--labels",
        ",".join(LABELS),
        "--student",
        str(work / "plusplus" / "student"),
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("scene00.png", "scene05.png"):
        expected = _mask(work / "plusplus" / "pred" / name)
        np.testing.assert_array_equal(read_mask(out / "masks" / name), expected)
    version = json.loads((out / "records" / "scene00.json").read_text())["model_version"]
    assert version.startswith("student-")

    stableseg = ["pseudo-label", str(images), "--labels", ",".join(LABELS), "--model",
                 str(tiny_model_dir), "--image-size", "64"]  # fmt: skip
    weights = work / "plusplus" / "weights.safetensors"
    weighted = run_cli(*stableseg, "--weights", str(weights), "--out", str(tmp_path / "weighted"))
    assert weighted.returncode == 0, weighted.stderr
    plain = run_cli(*stableseg, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    versions = {
        json.loads((tmp_path / name / "records" / "scene00.json").read_text())["model_version"]
        for name in ("weighted", "plain")
    }
    assert len(versions) == 2  # learned weights give another model version
