"""``label-studio predict``'s run against a stand-in Label Studio client: its uploads are the
backend's ``/predict`` answers, byte for byte (the real server: tests/test_labelstudio_recipe.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from labeler import SegmenterConfig
from labeler.model_settings import ModelSettings, ModelSpec
from ml_backend import cache, project
from ml_backend.model import StableSegBackend
from ml_backend.project import PredictOptions, backend_settings, run_predict

from .conftest import TINY_SIZE

CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image">'
    '<Label value="Cat" prompt="cat"/><Label value="dog"/><Label value="tree"/>'
    "</BrushLabels></View>"
)


class FakeClient:
    """The parts of label_studio_sdk.LabelStudio that ``run_predict`` calls, for one project."""

    def __init__(self, tasks: list[dict[str, Any]], config: str = CONFIG) -> None:
        self.config = config
        self.stored: list[dict[str, Any]] = []
        self.projects = SimpleNamespace(get=self._project, import_predictions=self._import)
        self.tasks = SimpleNamespace(list=self._list)
        self._tasks = tasks

    def _project(self, id: int, request_options: Any) -> Any:
        return SimpleNamespace(label_config=self.config)

    def _list(self, page: int = 1, page_size: int = 100, **kwargs: Any) -> Any:
        chunk = self._tasks[(page - 1) * page_size : page * page_size]
        tasks = [
            SimpleNamespace(
                id=t["id"], data=t["data"], predictions_model_versions=t.get("versions")
            )
            for t in chunk
        ]
        listing = SimpleNamespace(tasks=tasks, total=len(self._tasks))
        return SimpleNamespace(response=listing)

    def _import(self, id: int, request: list[dict[str, Any]], request_options: Any) -> None:
        self.stored.extend(json.loads(json.dumps(request)))


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    rng = np.random.default_rng(0)
    for name, (height, width) in {"a": (40, 56), "b": (33, 17), "c": (24, 24)}.items():
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    return tmp_path


def test_the_uploaded_predictions_are_the_backends(root, tiny_model_dir, monkeypatch):
    names = ["a", "notes", "b", "c", "a", "c", "b"]
    tasks = [
        {"id": 10 + i, "data": {"image": f"/data/local-files/?d={name}.png"}}
        for i, name in enumerate(names)
    ]
    settings = ModelSettings(
        ModelSpec(str(tiny_model_dir), device="cpu"),
        SegmenterConfig(image_size=TINY_SIZE, batch_size=2),
    )
    options = PredictOptions(
        url="http://label-studio.invalid", project=5, api_key="k", settings=settings, page_size=3
    )
    backend = StableSegBackend(CONFIG, settings=backend_settings(options))
    # The tasks the run predicts, in the same batches (float sums may differ by batch).
    expected = backend.predict_tasks(tasks[1:])
    version = cache.get_segmenter(backend.settings).model_version
    assert expected.model_version == version
    done = {**tasks[0], "versions": version}  # predicted by an earlier run: skipped
    client = FakeClient([done] + [dict(task) for task in tasks[1:]])
    monkeypatch.setattr(project, "connect", lambda url, key, timeout: client)
    segmenter = cache.get_segmenter(backend.settings)
    calls: list[int] = []
    real = segmenter.segment_pending  # what the model stage calls

    def counting(images, labels, **kwargs):
        calls.append(len(images))
        return real(images, labels, **kwargs)

    monkeypatch.setattr(segmenter, "segment_pending", counting)

    summary = run_predict(options)
    assert (summary.total, summary.done, summary.skipped) == (7, 5, 1)
    assert [error.item for error in expected.errors] == [11] and expected.errors[0].reason
    assert [(f.item, f.reason) for f in summary.failed] == [(11, expected.errors[0].reason)]
    assert calls == [2, 2, 1]  # full batches of --batch-size
    assert [body["task"] for body in client.stored] == [12, 13, 14, 15, 16]  # in task order
    for body in client.stored:
        prediction = {key: value for key, value in body.items() if key != "task"}
        assert json.dumps(prediction) == json.dumps(expected.predictions[body["task"] - 11])


@pytest.mark.slow
def test_a_polygon_project_gets_polygons_from_predict_and_the_backend(
    root, tiny_model_dir, monkeypatch
):
    """With PolygonLabels, ``label-studio predict`` uploads the backend's polygon predictions:
    one region per object, filling back to the brush masks of a BrushLabels project."""
    from exporters import decode_brush_result, decode_polygon_result

    polygon_config = CONFIG.replace("BrushLabels", "PolygonLabels")
    tasks = [
        {"id": 1 + i, "data": {"image": f"/data/local-files/?d={name}.png"}}
        for i, name in enumerate("ac")
    ]
    settings = ModelSettings(
        ModelSpec(str(tiny_model_dir), device="cpu"),
        SegmenterConfig(image_size=TINY_SIZE, batch_size=2),
    )
    options = PredictOptions(
        url="http://label-studio.invalid", project=5, api_key="k", settings=settings
    )
    brushes = StableSegBackend(CONFIG, settings=backend_settings(options)).predict_tasks(tasks)
    polygons = StableSegBackend(polygon_config, settings=backend_settings(options)).predict_tasks(
        tasks
    )
    client = FakeClient([dict(task) for task in tasks], polygon_config)
    monkeypatch.setattr(project, "connect", lambda url, key, timeout: client)
    summary = run_predict(options)
    assert summary.done == 2 and not summary.failed
    labels = ["Cat", "dog", "tree"]
    objects = 0
    for body, brush, polygon in zip(client.stored, brushes.predictions, polygons.predictions):
        assert json.dumps({k: v for k, v in body.items() if k != "task"}) == json.dumps(polygon)
        assert polygon["score"] == pytest.approx(brush["score"])
        height, width = brush["result"][0]["original_height"], brush["result"][0]["original_width"]
        painted = np.zeros((height, width), np.uint8)
        for region in brush["result"]:
            painted[decode_brush_result(region)] = (
                labels.index(region["value"]["brushlabels"][0]) + 1
            )
        filled = np.zeros((height, width), np.uint8)
        for region in polygon["result"]:
            assert region["type"] == "polygonlabels" and region["from_name"] == "tag"
            (label,) = region["value"]["polygonlabels"]
            filled[decode_polygon_result(region)] = labels.index(label) + 1
            objects += 1
        np.testing.assert_array_equal(filled, painted)
    assert objects > 2  # labels in several parts: one region per part
