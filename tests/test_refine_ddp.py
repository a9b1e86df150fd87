"""refine under torchrun with two CPU processes (gloo): the pool and the batches are shared."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest

from .refine_helpers import cli_args, make_pool

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_split_the_pool_and_train_ddp(tmp_path, tiny_model_dir) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    images, truth = make_pool(tmp_path)
    work = tmp_path / "W"
    command = [
        str(torchrun if torchrun.exists() else shutil.which("torchrun")),
        "--standalone",  # a free local port for the rendezvous
        "--nproc_per_node=2",
        str(REPO / "cli.py"),
        *cli_args(images, work, tiny_model_dir, epochs=2),
        "--train-batch-size",
        "2",
        "--val-gt",
        str(truth),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=PIPE, stderr=PIPE)
    try:
        _, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
        _, err = process.communicate(timeout=60)
        pytest.fail(f"torchrun did not finish in 300 s: {err.decode()[-3000:]}")
    stderr = err.decode()
    assert process.returncode == 0, stderr[-3000:]
    assert stderr.count("refine finished") == 1  # only process 0 reports

    report = json.loads((work / "report.json").read_text())
    assert report["finished"]
    for stage in ("plus", "plusplus"):
        train = report["stages"][stage]["train"]
        # 10 images over 2 processes, 2 a batch: 2 steps an epoch (one process alone takes 5).
        assert len(train["step_loss"]) == 4 and train["epochs"] == 2
        assert len(list((work / stage / "pred").glob("*.png"))) == 10
        assert report["stages"][stage]["predict"]["metrics"]["student"]["images"] == 10
    assert len(list((work / "cache").glob("*.safetensors"))) == 10
    assert (work / "plusplus" / "weights.safetensors").is_file()
