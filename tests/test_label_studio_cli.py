"""``stableseg label-studio predict`` without a server (help, usage errors, an unreachable
Label Studio), the task score, and the recipe docs/label-studio.md shows against
docs/label-studio-recipe.sh.

The command against a real Label Studio (a project predicted, killed halfway and rerun) is in
tests/test_labelstudio_recipe.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from exporters import brush_prediction, brush_results, prediction, task_score
from labeler.commands import main
from labeler.result import IGNORE

from .labelstudio_server import free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "docs" / "label-studio-recipe.sh"
RECIPE_PAGE = ROOT / "docs" / "label-studio.md"
DEMO_MODEL = str(ROOT / "demo" / "model")
STEP = re.compile(r"^# --8<-- \[start:([\w-]+)\]\n(.*?)^# --8<-- \[end:\1\]\n", re.M | re.S)
PAGE_STEP = re.compile(r"^<!-- recipe:([\w-]+) -->\n```bash\n(.*?)^```\n", re.M | re.S)


def _invoke(args: list[str], key: str | None = "0123456789abcdef"):
    env = {"LABEL_STUDIO_API_KEY": key, "LABEL_STUDIO_URL": None}
    return CliRunner().invoke(main, ["label-studio", "predict", *args], env=env)


# ---------------------------------------------------------------------- the command
def test_help_names_the_token_variable_and_the_exit_statuses():
    result = CliRunner().invoke(main, ["label-studio", "predict", "--help"])
    assert result.exit_code == 0, result.output
    for text in ("LABEL_STUDIO_API_KEY", "--project", "--image-size", "--upload-batch", "3 some"):
        assert text in result.output
    listing = CliRunner().invoke(main, ["--help"])
    assert "label-studio" in listing.output


@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        (["--url", "http://127.0.0.1:1", "--project", "1"], None, "set LABEL_STUDIO_API_KEY"),
        (["--url", "127.0.0.1:8080", "--project", "1"], "k", "is not an http(s) URL"),
        (["--url", "http://127.0.0.1:1", "--project", "0"], "k", "--project"),
        (["--project", "1"], "k", "--url"),
        (["--url", "http://h", "--project", "1", "--model", "./no-such-model"], "k", "no such"),
        (["--url", "http://h", "--project", "1", "--image-size", "0"], "k", "--image-size"),
    ],
)
def test_usage_errors_exit_2_before_anything_loads(args, key, message):
    result = _invoke(args, key)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_an_unreachable_label_studio_exits_1_naming_it():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = _invoke(["--url", url, "--project", "3", "--model", DEMO_MODEL, "--retries", "0"])
    assert result.exit_code == 1, result.output
    assert f"reading project 3 at {url} failed" in result.output


# ---------------------------------------------------------------------- the task score
def test_the_task_score_weights_each_label_by_its_painted_pixels():
    mask = np.zeros((4, 5), np.uint8)
    mask[0, :] = 1  # 5 pixels of "cat"
    mask[1, 0] = 2  # 1 pixel of "dog"
    mask[3, :] = IGNORE  # neither painted nor counted
    scores = {"cat": 0.9, "dog": 0.3}
    assert task_score(mask, ["cat", "dog"], scores) == pytest.approx((5 * 0.9 + 0.3) / 6)
    assert task_score(np.zeros((3, 3), np.uint8), ["cat"], {"cat": 0.5}) == 0.0
    assert task_score(mask, ["cat", "dog"], {"cat": 0.9}) == pytest.approx(4.5 / 6)  # dog: 0


def test_brush_prediction_is_the_brush_results_with_the_task_score():
    mask = np.array([[0, 1, 1], [2, 1, 0]], np.uint8)
    scores = {"cat": 0.8, "dog": 0.2}
    got = brush_prediction(mask, ["cat", "dog"], scores, "v1", "paint", "photo")
    results = brush_results(mask, ["cat", "dog"], scores, "paint", "photo")
    assert got == prediction(results, "v1", score=(3 * 0.8 + 0.2) / 4)


# ---------------------------------------------------------------------- the recipe
def _recipe_steps() -> dict[str, str]:
    return dict(STEP.findall(RECIPE.read_text()))


def test_the_recipe_is_nothing_but_its_steps():
    """What the docs show is what runs: no command outside a step."""
    text = RECIPE.read_text()
    steps = _recipe_steps()
    assert list(steps) == [
        "settings",
        "install",
        "start-label-studio",
        "token",
        "start-backend",
        "project",
        "storage",
        "connect",
        "predict-some",
        "prelabel",
        "predict-all",
        "review",
    ]
    outside = STEP.sub("", text).splitlines()
    commands = [line for line in outside if line.strip() and not line.startswith("#")]
    assert commands == ["set -euo pipefail"]


def test_the_label_studio_page_shows_every_recipe_step_verbatim():
    shown = dict(PAGE_STEP.findall(RECIPE_PAGE.read_text()))
    assert shown == _recipe_steps()
