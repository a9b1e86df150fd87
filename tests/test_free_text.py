"""Free-text prompts (ml_backend.free_text): the request Label Studio's labeling page sends when
the annotator submits a TextArea with Auto-Annotation on, through Flask's test client, on the
tiny random Stable Diffusion. The same request against a real Label Studio is in
tests/test_labelstudio_recipe.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exporters import brush_prediction
from labeler import SegmenterConfig, StableSeg
from labeler.model_settings import ModelSettings, ModelSpec
from ml_backend.backend_settings import BackendSettings
from ml_backend.free_text import FreeTextError, phrase_request
from ml_backend.label_config import parse_label_config, parse_prompt_areas
from ml_backend.server import create_app

from .conftest import TINY_SIZE

TEXTAREA = '<TextArea name="prompt" toName="image" editable="true" showSubmitButton="true"/>'


def _config(labels: str, extra: str = TEXTAREA) -> str:
    return (
        '<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="tag" toName="image">{labels}</BrushLabels>{extra}</View>'
    )


TWO_LABELS = _config('<Label value="Car"/><Label value="Sky" prompt="blue sky"/>')
ONE_LABEL = _config('<Label value="Thing"/>')


def _text(text: str, from_name: str = "prompt") -> dict:
    """A TextArea's result as Label Studio's labeling page serializes it."""
    return {
        "id": "Kf3",
        "from_name": from_name,
        "to_name": "image",
        "type": "textarea",
        "origin": "manual",
        "value": {"text": [text]},
    }


def _brush(label: str) -> dict:
    return {
        "id": "b1",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "value": {"format": "rle", "rle": [0], "brushlabels": [label]},
    }


def _ask(results: list[dict], config: str = TWO_LABELS, background: str | None = None):
    return phrase_request({"result": results}, config, parse_label_config(config), background)


# ---------------------------------------------------------------------- which label, which phrase
@pytest.mark.parametrize(
    ("results", "config", "expected"),
    [
        ([_text("Car: red car")], TWO_LABELS, ("red car", "Car")),
        ([_text("  car :  red   car ")], TWO_LABELS, ("red car", "Car")),  # case, spaces
        ([_text("Sky")], TWO_LABELS, ("Sky", "Sky")),  # the phrase is a label
        ([_text("blue sky")], TWO_LABELS, ("blue sky", "Sky")),  # ... or a label's prompt
        ([_text("Mario")], ONE_LABEL, ("Mario", "Thing")),  # the only label
        ([_text("Mario: the plumber")], ONE_LABEL, ("Mario: the plumber", "Thing")),
        ([_text("Mario"), _brush("Car")], TWO_LABELS, ("Mario", "Car")),  # named in the context
        ([_text("Sky: clouds"), _brush("Car")], TWO_LABELS, ("clouds", "Sky")),  # typed wins
        ([_brush("Sky")], TWO_LABELS, ("blue sky", "Sky")),  # smart brush: the label's prompt
        ([_text("Car: old"), _text("Car: red car")], TWO_LABELS, ("red car", "Car")),  # newest
    ],
)
def test_the_label_comes_from_the_text_the_context_or_the_config(results, config, expected):
    request = _ask(results, config)
    assert (request.phrase, request.label) == expected
    assert request.background_prompt == "background"


@pytest.mark.parametrize(
    "results",
    [
        [],
        [_text("Car: red", from_name="notes")],  # not a TextArea of the config
        [{"type": "keypointlabels", "from_name": "kp", "value": {"x": 1, "y": 2}}],
        [{"type": "textarea", "from_name": "prompt", "value": {"text": ["  "]}}],
        ["not a result"],
    ],
)
def test_requests_without_a_phrase_or_brush_label_are_not_free_text(results):
    assert _ask(results) is None
    assert phrase_request(None, TWO_LABELS, parse_label_config(TWO_LABELS)) is None


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([_text("Mario")], "Start the text with a label and a colon, e.g. 'Car: Mario'"),
        ([_brush("Boat")], "unknown brush label 'Boat'"),
        ([_text("Car:")], "the phrase is empty"),
        ([_text("Car: " + "red " * 60)], "more than 200"),
        ([_text("Car: red\u200bcar")], "invisible"),
        (
            [_text("Car: Background")],
            "duplicate label 'background' (the phrase and the background prompt)",
        ),
    ],
)
def test_unusable_requests_say_what_to_type(results, message):
    with pytest.raises(FreeTextError, match=re.escape(message)):
        _ask(results)


def test_the_background_prompt_comes_from_the_textarea_then_the_settings():
    config = _config('<Label value="Car"/>', TEXTAREA.replace("/>", ' backgroundPrompt="road"/>'))
    assert _ask([_text("red car")], config, "street").background_prompt == "road"
    assert _ask([_text("red car")], ONE_LABEL, "street").background_prompt == "street"
    assert parse_prompt_areas(config, parse_label_config(config))["prompt"].background_prompt == (
        "road"
    )
    assert (
        parse_prompt_areas(_config('<Label value="A"/>', ""), parse_label_config(ONE_LABEL)) == {}
    )


# ---------------------------------------------------------------------- through /predict
@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("files")
    pixels = (np.random.default_rng(3).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "a.png")
    return root


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, image_root: Path):
    stableseg = ModelSettings(
        ModelSpec(str(tiny_model_dir), device="cpu"),
        SegmenterConfig(image_size=TINY_SIZE, batch_size=2),
    )
    settings = BackendSettings(stableseg=stableseg, local_files_document_root=str(image_root))
    return create_app(settings).test_client()


def _predict(client, config: str, results: list[dict] | None) -> tuple[int, dict]:
    body = {
        "tasks": [{"id": 4, "data": {"image": "/data/local-files/?d=a.png"}}],
        "label_config": config,
        "project": "2.1700000000",
        "params": {"login": None, "password": None, "context": {"result": results}},
    }
    if results is None:
        body["params"]["context"] = None
    response = client.post("/predict", json=body)
    return response.status_code, response.get_json()


def test_a_phrase_is_segmented_against_background_and_painted_under_its_label(
    client, tiny_model: StableSeg, image_root: Path
):
    status, body = _predict(client, TWO_LABELS, [_text("Sky: a small cloud")])
    assert status == 200 and body["errors"] == []
    config = tiny_model.config.replace(background_prompt="background")
    phrase_model = tiny_model.with_config(config)
    image = Image.open(image_root / "a.png").convert("RGB")
    result = phrase_model.segment([image], ["a small cloud"])[0]
    expected = brush_prediction(
        result.mask,
        ["Sky"],
        {"Sky": result.scores["a small cloud"]},
        phrase_model.model_version,
        "tag",
        "image",
    )
    assert body["results"] == [expected]
    assert body["model_version"] == phrase_model.model_version


@pytest.mark.parametrize(
    ("text", "what_to_type"),
    [("red car", "'Car: red car'"), ("Car: " + "red car " * 900_000, "'Car: red car'")],
    ids=["no-label", "7-MB"],
)
def test_a_refused_phrase_comes_back_where_label_studio_shows_it(
    client, caplog, text, what_to_type
):
    """Label Studio 1.23.2 shows the annotator suggestions only (see ml_backend.free_text): the
    message is a suggestion on the TextArea, the reason in ``errors``, the log at WARNING. A
    7 MB phrase is refused by its length, before anything normalises it."""
    caplog.set_level("WARNING", logger="ml_backend.free_text")
    started = time.monotonic()
    status, body = _predict(client, TWO_LABELS, [_text(text)])
    elapsed = time.monotonic() - started
    assert status == 200, body
    [region] = body["results"][0]["result"]
    assert (region["from_name"], region["to_name"], region["type"]) == (
        "prompt",
        "image",
        "textarea",
    )
    assert what_to_type in region["value"]["text"][0]
    assert body["errors"] == [
        {"task": 4, "reason": region["value"]["text"][0][len("Not painted: ") :]}
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(what_to_type in message for message in warnings), warnings
    assert elapsed < 2, f"{elapsed:.1f} s to refuse"


def test_an_unknown_brush_label_from_an_api_caller_is_a_400(client):
    status, body = _predict(client, TWO_LABELS, [_brush("Boat")])
    assert status == 400 and "unknown brush label 'Boat'" in body["detail"]


def test_requests_without_a_free_text_context_get_every_label(client):
    plain_status, plain = _predict(client, TWO_LABELS, None)
    other_status, other = _predict(
        client, TWO_LABELS, [{"type": "keypointlabels", "from_name": "kp", "value": {}}]
    )
    assert plain_status == other_status == 200
    assert plain == other
    labels = {r["value"]["brushlabels"][0] for r in plain["results"][0]["result"]}
    assert labels <= {"Car", "Sky"} and labels
