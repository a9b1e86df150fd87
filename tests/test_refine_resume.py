"""refine resumes after an interruption between stages or inside training, with the same result.

These runs use --no-crf: DenseCRF's float rounding varies by an ulp with memory alignment, and a
pixel at exactly the uncertain threshold then flips, which would hide what is tested here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labeler.jobs.refine import run_refine
from labeler.train.trainer_settings import PseudoConfig

from .refine_helpers import cli_args, contents, fast_options, make_pool, one_thread  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


class Stop(Exception):
    """Stands for a kill: raised from the progress hook at a chosen point."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run with two epochs per student: (pool folder, options, work dir)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("refine-resume")
    images, _ = make_pool(root)
    options = fast_options(
        tiny_model_dir,
        student=_two_epochs(fast_options(tiny_model_dir)),
        pseudo=PseudoConfig(crf=False),
    )
    run_refine(images, root / "reference", options)
    torch.set_num_threads(before)
    return images, options, root / "reference"


def _two_epochs(options):
    from dataclasses import replace

    return replace(options.student, epochs=2, train_batch_size=3)


def _losses(work: Path) -> dict:
    stages = json.loads((work / "report.json").read_text())["stages"]
    return {
        "plus": stages["plus"]["train"]["step_loss"],
        "plusplus": stages["plusplus"]["train"]["step_loss"],
        "fit": stages["plusplus"]["fit"]["loss"],
    }


@pytest.mark.parametrize("stop_at", ["plus.train.epoch1", "plusplus.fit.done"])
def test_interrupted_run_resumes_to_the_same_files(reference, tmp_path, stop_at) -> None:
    images, options, reference_dir = reference
    seen: list[str] = []

    def hook(event: str) -> None:
        seen.append(event)
        if event == stop_at:
            raise Stop(event)

    with pytest.raises(Stop):
        run_refine(images, tmp_path / "W", options, on_event=hook)
    state = json.loads((tmp_path / "W" / "state.json").read_text())
    if stop_at == "plus.train.epoch1":
        assert (tmp_path / "W" / "plus" / "checkpoint.pt").exists()
        assert "plus.train" not in state["steps"]
    else:
        assert "plusplus.fit" in state["steps"] and "plusplus.pseudo" not in state["steps"]

    # A kill inside a write leaves its temporary file; the finished run must not keep it.
    for folder in ("plus", "stableseg"):
        if (tmp_path / "W" / folder).is_dir():
            (tmp_path / "W" / folder / ".checkpoint.pt.k1lled.tmp").write_bytes(b"partial")
    resumed: list[str] = []
    result = run_refine(images, tmp_path / "W", options, on_event=resumed.append)
    assert not result.already_done and result.report["finished"]
    assert not set(resumed) & {e for e in seen if e.endswith(".done")}  # nothing redone
    if stop_at == "plus.train.epoch1":
        assert "plus.train.epoch1" not in resumed and "plus.train.epoch2" in resumed
    assert contents(tmp_path / "W") == contents(reference_dir)
    assert _losses(tmp_path / "W") == _losses(reference_dir)


def _cli_command(images: Path, work: Path, model_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "cli.py"),
        *cli_args(images, work, model_dir, epochs=2),
        "--train-batch-size",
        "3",
        "--no-crf",
    ]


# One torch thread in the children too, as in the reference fixture.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_killed_cli_run_resumes(reference, tmp_path, tiny_model_dir) -> None:
    """SIGKILL of `python cli.py refine` after stage 1; the rerun finishes the same run as the
    same command run once without a kill (both in fresh processes, like a user's)."""
    images = reference[0]
    whole = tmp_path / "whole"
    uninterrupted = subprocess.run(
        _cli_command(images, whole, tiny_model_dir), cwd=REPO, env=CHILD_ENV, capture_output=True
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr.decode()[-3000:]

    work = tmp_path / "W"
    command = _cli_command(images, work, tiny_model_dir)
    log = tmp_path / "killed.log"  # a file, not a pipe: nothing can block on a full buffer
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        deadline = time.monotonic() + 300
        state_file = work / "state.json"
        while time.monotonic() < deadline and process.poll() is None:
            if state_file.exists() and "stableseg" in json.loads(state_file.read_text())["steps"]:
                break
            time.sleep(0.05)
        assert process.poll() is None, log.read_text()[-3000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    steps = json.loads(state_file.read_text())["steps"]
    assert "stableseg" in steps and "plusplus.predict" not in steps

    finished = subprocess.run(command, cwd=REPO, env=CHILD_ENV, capture_output=True, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    assert "refine finished" in finished.stderr.decode()
    assert contents(work) == contents(whole)
    assert _losses(work) == _losses(whole)

    again = subprocess.run(command, cwd=REPO, env=CHILD_ENV, capture_output=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stderr.decode()
