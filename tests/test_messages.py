"""Messages a first run meets: an unreachable hub said as such after one try, and settings named
by their flags in every usage error."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from labeler.commands import main
from labeler.jobs.models import hub_load_options, load_stableseg, quiet_model_loading
from labeler.model_settings import ModelSettings, ModelSpec, SegmenterConfig
from labeler.settings import user_names

from .labelstudio_server import free_port

ROOT = Path(__file__).resolve().parent.parent
REPO = "someone/stable-diffusion-test"


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """A hub address where nothing listens, and an empty Hugging Face cache: no network used."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_an_unreachable_hub_is_said_after_one_try(no_hub):
    quiet_model_loading()  # imports diffusers and transformers: not what is timed
    started = time.monotonic()
    with pytest.raises(ValueError) as caught:
        load_stableseg(ModelSpec(REPO, device="cpu"))
    assert time.monotonic() - started < 10  # one refused request, not half a minute of retries
    message = str(caught.value)
    assert f"--model {REPO}: could not reach the Hugging Face hub" in message
    assert "offline? pass a local folder" in message and "config.json" not in message


def test_a_cached_model_loads_when_the_hub_cannot_be_reached(no_hub):
    snapshot = no_hub / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(ROOT / "demo" / "model", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert hub_load_options(REPO) == {"local_files_only": True}
    started = time.monotonic()
    model = load_stableseg(ModelSpec(REPO, device="cpu"))
    assert model.input_size == 64 and time.monotonic() - started < 60


def test_a_local_folder_needs_no_hub(no_hub):
    assert hub_load_options(str(ROOT / "demo" / "model")) == {}


def test_dataclass_errors_name_the_flags():
    assert user_names(SegmenterConfig, "image_size must be a multiple of 8, got 500") == (
        "--image-size must be a multiple of 8, got 500"
    )
    assert user_names(SegmenterConfig, "self_only=True needs use_sar=True (why)") == (
        "--self-only needs --sar (why)"
    )
    # one-word names only where they are the subject: prose stays prose
    assert user_names(ModelSettings, "the model has no timestep") == "the model has no timestep"
    assert user_names(SegmenterConfig, "timestep must be >= 0") == "--timestep must be >= 0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-size", "500"], "--image-size must be a positive multiple of 8, got 500"),
        (["--self-only", "--no-sar"], "--self-only needs --sar"),
        (["--prompt-template", "a photo"], "--prompt-template must contain '{}'"),
    ],
)
def test_usage_errors_name_flags_not_python_names(tmp_path, args, message):
    base = ["pseudo-label", str(tmp_path), "--labels", "red", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*base, "--model", str(ROOT / "demo" / "model"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "_" not in result.output.split("Error:")[1].split("got")[0]  # no Python name
