"""start_background_refine (``labeler.jobs.refine.threaded``): what the Label Studio backend's
START_TRAINING webhook calls."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from labeler import load_map_weights
from labeler.jobs.refine.threaded import (
    get_background_refine,
    latest_refine_weights,
    start_background_refine,
)

from .refine_helpers import LABELS, fast_options, make_pool, one_thread  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_background_run_on_paths_and_images(tmp_path, tiny_model_dir) -> None:
    images, _ = make_pool(tmp_path, count=6)
    paths = sorted(images.glob("*.png"))
    with Image.open(paths[0]) as first:
        downloaded = first.copy()  # as the backend holds a fetched task image
    tasks = [downloaded, *paths[1:]]
    pool = tmp_path / "runs" / "project-7"

    def downloads():  # as Start Training loads them: one at a time, each written before the next
        for index, task in enumerate(tasks):
            if index == 1:
                assert list(pool.glob("run-*/pool/00000.png")), "image 0 not yet written"
            yield task

    finished = []
    options = fast_options(tiny_model_dir)
    run = start_background_refine(
        "7", downloads, options, tmp_path / "runs", on_finish=finished.append
    )
    again = start_background_refine("7", tasks, options, tmp_path / "runs")
    assert again is run  # one run at a time per project
    assert get_background_refine(7) is run
    assert run.wait(timeout=600)
    assert run.status == "finished", run.error
    assert finished == [run]
    assert run.work_dir.parent == tmp_path / "runs" / "project-7"
    assert (run.work_dir / "pool" / "00000.png").is_file()  # the PIL image, saved
    assert run.weights_path == run.work_dir / "plusplus" / "weights.safetensors"
    assert set(load_map_weights(run.weights_path))
    assert run.student_path == run.work_dir / "plusplus" / "student"
    assert run.model_version.startswith("stableseg++-")
    assert latest_refine_weights(tmp_path / "runs", 7) == run.weights_path
    assert latest_refine_weights(tmp_path / "runs", 8) is None


def test_a_failing_run_reports_why(tmp_path, tiny_model_dir) -> None:
    missing = [Path(tmp_path / "gone.png"), Path(tmp_path / "also-gone.png")]
    run = start_background_refine("9", missing, fast_options(tiny_model_dir), tmp_path / "runs")
    assert run.wait(timeout=300)
    assert run.status == "failed" and "readable image" in run.error
    assert run.weights_path is None and run.model_version is None
