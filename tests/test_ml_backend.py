"""The Label Studio ML backend through Flask's test client, on the tiny random Stable Diffusion.

Images are real files (local-files root) or come from a real HTTP server on 127.0.0.1 that
plays the parts of Label Studio's file endpoints and of a plain web server.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from exporters import brush_results, decode_brush_result, image_url, prediction, task_score
from labeler import SegmenterConfig, StableSeg
from labeler.images import ImageError, open_image
from labeler.model_settings import ModelSettings, ModelSpec
from labeler.train.trainer_settings import StudentConfig
from labeler.weights import map_weights_to_bytes
from ml_backend import cache
from ml_backend.backend_settings import BackendSettings
from ml_backend.fetch import GENERIC_ERROR
from ml_backend.images import ImageLoader, LabelStudioAuth, is_jwt, safe_local_path
from ml_backend.label_config import LabelConfigError, parse_label_config
from ml_backend.server import create_app

from .conftest import TINY_SIZE
from .support import jwt, local_http_server

GOLDEN = Path(__file__).parent / "golden" / "ml_backend_predict.json"
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image">'
    '<Label value="cat"/><Label value="dog"/><Label value="tree"/>'
    "</BrushLabels></View>"
)
LABELS = ["cat", "dog", "tree"]
MAX_PIXELS = 3000  # the test images are at most 40 x 56 = 2240 pixels
MAX_BYTES = 20_000


REFRESH_TOKEN = jwt({"token_type": "refresh", "exp": 4102444800})
ACCESS_TOKEN = jwt({"token_type": "access", "exp": 4102444800})
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def _png(height: int, width: int, seed: int) -> bytes:
    from labeler.jobs.io import image_bytes

    rng = np.random.default_rng(seed)
    return image_bytes(Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)))


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def images_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local-files document root with good and bad files, and a secret outside it."""
    base = tmp_path_factory.mktemp("ls-files")
    root = base / "root"
    (root / "imgs" / "sub dir").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(_png(40, 56, seed=1))
    (root / "imgs" / "sub dir" / "b #1.png").write_bytes(_png(33, 17, seed=2))
    (root / "imgs" / "c.png").write_bytes(_png(24, 24, seed=3))
    rotated = Image.fromarray((np.random.default_rng(4).random((20, 36, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "imgs" / "exif.jpg", exif=exif.tobytes(), quality=95)
    (root / "imgs" / "notes.png").write_text("this is not an image")
    (root / "imgs" / "empty.png").write_bytes(b"")
    (root / "imgs" / "huge.png").write_bytes(_png(60, 60, seed=5))
    (base / "secret.png").write_bytes(_png(10, 10, seed=6))
    os.symlink(base / "secret.png", root / "imgs" / "escape.png")
    os.symlink(root / "imgs" / "a.png", root / "imgs" / "inside.png")
    return root


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path, images_root: Path) -> BackendSettings:
    stableseg = ModelSettings(
        ModelSpec(str(tiny_model_dir), device="cpu"),
        SegmenterConfig(image_size=TINY_SIZE, batch_size=2),
    )
    return BackendSettings(
        stableseg=stableseg,
        local_files_document_root=str(images_root),
        max_pixels=MAX_PIXELS,
        max_image_bytes=MAX_BYTES,
        http_timeout=1.0,
        allowed_hosts=("127.0.0.1",),  # the `web` server below; loopback is refused by default
    )


@pytest.fixture
def client(settings: BackendSettings):
    return create_app(settings).test_client()


class FakeLabelStudio(BaseHTTPRequestHandler):
    """Label Studio's file and token endpoints, and a plain web server, on 127.0.0.1."""

    files: ClassVar[dict[str, bytes]] = {
        "/data/upload/1/up.png": _png(30, 20, seed=7),
        "/web/pic.png": _png(22, 31, seed=8),
    }
    seen_auth: ClassVar[list[str | None]] = []  # shared by the handler threads on purpose
    project_tasks: ClassVar[dict[str, list[dict]]] = {}  # GET /api/tasks?project=ID

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/png") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/api/token/refresh/" and body.get("refresh") == REFRESH_TOKEN:
            self._send(200, json.dumps({"access": ACCESS_TOKEN}).encode(), "application/json")
        else:
            self._send(401, b'{"detail": "invalid"}', "application/json")

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        path = self.path
        if path.startswith(("/data/", "/tasks/", "/api/")):
            self.seen_auth.append(auth)
            if auth not in (f"Token {LEGACY_TOKEN}", f"Bearer {ACCESS_TOKEN}"):
                return self._send(401, b"unauthorised", "text/plain")
        if path.startswith("/api/tasks?"):
            project = parse_qs(urlsplit(path).query)["project"][0]
            tasks = self.project_tasks.get(project, [])
            body = {"tasks": tasks, "total": len(tasks)}
            return self._send(200, json.dumps(body).encode(), "application/json")
        if path.startswith("/data/local-files/?d="):
            return self._send(200, self.files["/data/upload/1/up.png"])
        if path.startswith("/tasks/5/presign/?fileuri="):
            return self._send(200, self.files["/web/pic.png"])
        if path == "/web/big.png":  # announced as too big
            return self._send(200, b"\0" * (MAX_BYTES + 1))
        if path == "/web/stream.png":  # no length announced, then too much
            self.send_response(200)
            self.end_headers()
            for _ in range(MAX_BYTES // 1000 + 5):
                self.wfile.write(b"\0" * 1000)
            return None
        if path == "/web/slow.png":
            time.sleep(2.5)
            return self._send(200, self.files["/web/pic.png"])
        if path in self.files:
            return self._send(200, self.files[path])
        return self._send(404, b"not found", "text/plain")


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    with local_http_server(FakeLabelStudio) as url:
        yield url


def _one_line(match: re.Match) -> str:
    return "[" + re.sub(r"\s+", "", match[1]) + "]"


def _scores(body: dict) -> list[float]:
    return [p["score"] for p in body["results"]] + [
        r["score"] for p in body["results"] for r in p["result"]
    ]


def _without_scores(body: dict) -> dict:
    copy = json.loads(json.dumps(body))
    for prediction_ in copy["results"]:
        prediction_.pop("score")
        for region in prediction_["result"]:
            region.pop("score")
    return copy


def _task(task_id: int, url: str) -> dict:
    return {"id": task_id, "data": {"image": url}}


def _local(relative: str) -> str:
    return f"/data/local-files/?d={relative}"


def _expected(
    model: StableSeg, paths: list[Path], prompts: list[str], labels: list[str]
) -> list[dict]:
    """What `cli.py pseudo-label` writes for these images: one segment call + exporters."""
    out = []
    for result in model.segment([open_image(path) for path in paths], prompts):
        scores = {label: result.scores[p] for label, p in zip(labels, prompts)}
        regions = brush_results(result.mask, labels, scores, "tag", "image")
        out.append(
            prediction(regions, model.model_version, task_score(result.mask, labels, scores))
        )
    return json.loads(json.dumps(out))  # as it comes back through JSON


# ---------------------------------------------------------------------- health and setup
def test_health_answers_up_without_loading_the_model(client, settings):
    cache.clear()
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "UP" and body["model_dir"] == settings.model.source
    assert body["model_loaded"] is False
    assert cache.loaded_models() == []


def test_setup_is_cheap_and_reports_the_loaded_models_version(client, settings):
    cache.clear()
    response = client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    assert response.status_code == 200
    version = response.get_json()["model_version"]
    assert cache.loaded_models() == []  # /setup never loads the weights
    assert version == cache.get_segmenter(settings).model_version
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).get_json() == {
        "model_version": version
    }


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (None, "no labeling config"),
        ("<View><Image name='image' value='$image'/></View>", "no <BrushLabels>"),
        (
            "<View><Text name='text' value='$text'/>"
            "<BrushLabels name='tag' toName='text'><Label value='a'/></BrushLabels></View>",
            "pointing at an <Image",
        ),
        (
            "<View><Image name='image' value='$image'/>"
            "<BrushLabels name='tag' toName='image'></BrushLabels></View>",
            "has no <Label>",
        ),
        ("<View><Image name='image'", "not valid XML"),
    ],
)
def test_setup_refuses_configs_without_brushlabels_on_an_image(client, schema, expected, caplog):
    with caplog.at_level(logging.ERROR, logger="ml_backend"):
        response = client.post("/setup", json={"project": "2.1", "schema": schema})
    assert response.status_code == 400
    assert expected in response.get_json()["detail"]
    assert expected in caplog.text
    assert client.get("/health").status_code == 200  # the server stays up


# ---------------------------------------------------------------------- label config parsing
def test_label_config_prompts_come_from_prompt_then_predicted_values_then_value():
    target = parse_label_config(
        '<View><Image name="img" value="$photo"/><Text name="t" value="$text"/>'
        '<Choices name="c" toName="img"><Choice value="x"/></Choices>'
        '<View><BrushLabels name="brush" toName="img">'
        '<Label value="Car" prompt="red car"/>'
        '<Label value="Road" predicted_values="street, road"/>'
        '<Label value="Sky"/><Label value="Person" alias="person"/>'
        "</BrushLabels></View></View>"
    )
    assert (target.from_name, target.to_name, target.data_key) == ("brush", "img", "photo")
    assert target.labels == ("Car", "Road", "Sky", "person")
    assert target.prompts == ("red car", "street", "Sky", "person")


def test_label_config_with_two_labels_sharing_a_prompt_is_refused():
    with pytest.raises(LabelConfigError, match="same prompt"):
        parse_label_config(
            '<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i">'
            '<Label value="Car"/><Label value="Auto" prompt="car"/></BrushLabels></View>'
        )


# ---------------------------------------------------------------------- predictions
def test_predict_matches_the_golden_file(client, settings, images_root):
    tasks = [
        _task(11, _local("imgs/a.png")),
        _task(12, _local("imgs/sub%20dir/b%20%231.png")),
    ]
    response = client.post(
        "/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "3.1"}
    )
    assert response.status_code == 200
    body = response.get_json()
    version = cache.get_segmenter(settings).model_version
    assert body["model_version"] == version
    assert body["errors"] == []
    # The version hashes the model's folder (a temporary path): compare it apart.
    normalised = json.loads(json.dumps(body).replace(version, "<model_version>"))
    if os.environ.get("STABLESEG_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        text = json.dumps(normalised, indent=1, sort_keys=True)
        text = re.sub(r"\[\s*(\d+(?:,\s*\d+)*)\s*\]", _one_line, text)  # RLE on one line
        GOLDEN.write_text(text + "\n")
    golden = json.loads(GOLDEN.read_text())
    # Structure and RLE exactly; float scores to 1e-5 (summation order may differ by CPU).
    assert _without_scores(normalised) == _without_scores(golden)
    assert _scores(normalised) == pytest.approx(_scores(golden), rel=1e-5)
    for prediction_ in body["results"]:
        assert prediction_["model_version"] == version
        assert 0.0 < prediction_["score"] <= 1.0
        for region in prediction_["result"]:
            assert region["type"] == "brushlabels"
            assert (region["from_name"], region["to_name"]) == ("tag", "image")
            assert region["value"]["format"] == "rle"
            assert region["value"]["brushlabels"][0] in LABELS


def test_predict_equals_segment_plus_exporters_pixel_for_pixel(client, tiny_model, images_root):
    names = ["imgs/sub dir/b #1.png", "imgs/c.png", "imgs/exif.jpg"]
    tasks = [_task(i, image_url("/data/local-files/?d=", name)) for i, name in enumerate(names)]
    body = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).get_json()
    assert body["errors"] == []
    expected = _expected(tiny_model, [images_root / name for name in names], LABELS, LABELS)
    assert body["results"] == expected
    for got in body["results"]:
        masks = [decode_brush_result(r) for r in got["result"]]
        assert sum(m.astype(int) for m in masks).max() == 1  # every pixel in one region
    exif = body["results"][2]["result"][0]
    assert (exif["original_width"], exif["original_height"]) == (20, 36)  # EXIF-transposed


def test_label_prompts_drive_the_model_and_label_values_name_the_results(
    client, tiny_model, images_root
):
    config = (
        '<View><Image name="photo" value="$img"/><BrushLabels name="paint" toName="photo">'
        '<Label value="Feline" prompt="cat"/><Label value="Canine" predicted_values="dog"/>'
        '<Label value="tree"/></BrushLabels></View>'
    )
    task = {"id": 1, "data": {"img": _local("imgs/a.png")}}
    body = client.post("/predict", json={"tasks": [task], "label_config": config}).get_json()
    result = tiny_model.segment([open_image(images_root / "imgs/a.png")], LABELS)[0]
    labels = ["Feline", "Canine", "tree"]
    scores = {label: result.scores[p] for label, p in zip(labels, LABELS)}
    expected = brush_results(result.mask, labels, scores, "paint", "photo")
    assert body["results"][0]["result"] == expected


def test_every_bad_task_gets_no_prediction_and_a_reason_while_the_others_get_theirs(
    client, web, caplog
):
    bad = {
        101: (_local("imgs/missing.png"), "no such file"),
        102: (_local("imgs/notes.png"), "not an image"),
        103: (_local("imgs/empty.png"), "empty file"),
        104: (_local("imgs/huge.png"), "more than the limit"),
        105: (_local("../secret.png"), "without '..'"),
        106: (_local("imgs/%2e%2e/../secret.png"), "without '..'"),
        107: (_local("/etc/passwd"), "without '..'"),
        108: (_local("imgs/escape.png"), "leads outside"),
        109: (_local(""), "empty ?d= path"),
        110: ("/data/upload/1/up.png", "set LABEL_STUDIO_URL"),
        111: ("ftp://example.invalid/a.png", "unsupported image URL scheme"),
        112: (f"{web}/web/missing.png", GENERIC_ERROR),  # the log says HTTP 404
        113: (f"{web}/web/big.png", GENERIC_ERROR),  # announced as too big
        114: (f"{web}/web/stream.png", GENERIC_ERROR),  # too big as it arrives
        115: (f"{web}/web/slow.png", GENERIC_ERROR),  # past the deadline
        116: ("", "no image URL"),
        117: ("s3://bucket/a.png", "set LABEL_STUDIO_URL"),
    }
    tasks = [_task(1, _local("imgs/a.png"))]
    tasks += [_task(task_id, url) for task_id, (url, _) in bad.items()]
    tasks += [{"id": 118, "data": {"other": "x"}}, {"id": 119}, _task(2, _local("imgs/inside.png"))]
    with caplog.at_level(logging.WARNING, logger="ml_backend"):
        response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert response.status_code == 200
    body = response.get_json()
    results = body["results"]
    assert len(results) == len(tasks)
    assert results[0]["result"] and results[-1]["result"]
    assert results[0]["result"] == results[-1]["result"]  # inside.png is a link to a.png
    assert all(r == [] for r in results[1:-1])
    reasons = {e["task"]: e["reason"] for e in body["errors"]}
    assert set(reasons) == {*bad, 118, 119}
    for task_id, (_, expected) in bad.items():
        assert expected in reasons[task_id], (task_id, reasons[task_id])
    assert "no 'image' field" in reasons[118] and "no 'data'" in reasons[119]
    for task_id in reasons:
        assert f"task {task_id} gets no prediction" in caplog.text
    for detail in ("HTTP 404", "20001 bytes announced", "more than the limit of 20000 bytes"):
        assert detail in caplog.text  # the caller gets the generic message, the log the detail
    assert "took longer than STABLESEG_HTTP_TIMEOUT" in caplog.text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("not json", "JSON object"),
        ({"tasks": "nope", "label_config": CONFIG}, "'tasks' must be a list"),
        ({"tasks": [_task(1, _local("imgs/a.png"))], "label_config": "<View/>"}, "BrushLabels"),
    ],
)
def test_bad_requests_get_a_clear_400_and_the_server_stays_up(client, body, expected, caplog):
    with caplog.at_level(logging.ERROR, logger="ml_backend"):
        if isinstance(body, str):
            response = client.post("/predict", data=body, content_type="text/plain")
        else:
            response = client.post("/predict", json=body)
    assert response.status_code == 400
    assert expected in response.get_json()["detail"]
    if "BrushLabels" in expected:
        assert "BrushLabels" in caplog.text
    assert client.get("/health").status_code == 200


def test_the_tasks_of_a_request_go_through_segment_in_full_batches(client, settings, monkeypatch):
    segmenter = cache.get_segmenter(settings)
    calls: list[int] = []
    real = segmenter.segment_pending  # what the model stage calls

    def counting(images, labels, **kwargs):
        calls.append(len(images))
        return real(images, labels, **kwargs)

    monkeypatch.setattr(segmenter, "segment_pending", counting)
    names = ["imgs/a.png", "imgs/c.png", "imgs/notes.png", "imgs/a.png"]
    tasks = [_task(i, _local(n)) for i, n in enumerate(names)]
    body = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).get_json()
    assert segmenter.config.batch_size == 2
    assert calls == [2, 1]  # the model stage: batches of config.batch_size, the rest at the end
    assert [bool(r) for r in body["results"]] == [True, True, False, True]
    calls.clear()
    many = [_task(i, _local("imgs/c.png")) for i in range(5)]
    body = client.post("/predict", json={"tasks": many, "label_config": CONFIG}).get_json()
    assert calls == [2, 2, 1]
    assert len(body["results"]) == 5 and all(r["result"] for r in body["results"])


def test_a_failing_batch_is_segmented_image_by_image(client, settings, monkeypatch, caplog):
    segmenter = cache.get_segmenter(settings)
    real = segmenter.segment_pending  # what the model stage calls

    def picky(images, labels, **kwargs):
        if len(images) > 1 or images[0].size == (24, 24):  # c.png, prepared for the model
            raise ValueError("this one is cursed")
        return real(images, labels, **kwargs)

    monkeypatch.setattr(segmenter, "segment_pending", picky)
    tasks = [_task(7, _local("imgs/a.png")), _task(8, _local("imgs/c.png"))]
    with caplog.at_level(logging.WARNING, logger="ml_backend"):
        body = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).get_json()
    assert body["results"][0]["result"] and body["results"][1] == []
    assert "task 8 gets no prediction: segmentation failed: this one is cursed" in caplog.text


def test_the_model_is_loaded_once_per_process(client, settings, monkeypatch):
    cache.clear()
    loads = []
    real = StableSeg.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(StableSeg, "from_pretrained", classmethod(counting))
    for _ in range(3):
        client.post("/setup", json={"project": "1.1", "schema": CONFIG})
        task = _task(1, _local("imgs/c.png"))
        client.post("/predict", json={"tasks": [task], "label_config": CONFIG})
    assert len(loads) == 1


def test_concurrent_requests_all_succeed_one_pass_at_a_time(settings, monkeypatch):
    app = create_app(settings)
    segmenter = cache.get_segmenter(settings)
    real = segmenter.segment_pending  # what the model stage calls
    active, peak = [0], [0]
    guard = threading.Lock()

    def watched(images, labels, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)
            return real(images, labels, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(segmenter, "segment_pending", watched)
    task = _task(1, _local("imgs/a.png"))
    statuses, bodies = [], []

    def post() -> None:
        response = app.test_client().post(
            "/predict", json={"tasks": [task, task], "label_config": CONFIG}
        )
        statuses.append(response.status_code)
        bodies.append(response.get_json()["results"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert statuses == [200] * 8
    assert all(b == bodies[0] for b in bodies) and bodies[0][0]["result"]
    assert peak[0] == 1  # the GPU lock serialised the passes


def test_model_version_changes_with_config_and_learned_weights(settings, tiny_model, tmp_path):
    base = cache.model_version(settings)
    segmenter = settings.stableseg.segmenter.replace(image_size=2 * TINY_SIZE)
    bigger = replace(settings, stableseg=replace(settings.stableseg, segmenter=segmenter))
    assert cache.model_version(bigger) != base
    layers = [layer.name for layer in tiny_model.attention_layers()]
    weights_file = tmp_path / "weights.safetensors"
    weights_file.write_bytes(map_weights_to_bytes(dict.fromkeys(layers, 1.0)))
    weighted = replace(settings, stableseg=replace(settings.stableseg, weights=weights_file))
    first = cache.model_version(weighted)
    assert first not in (base, cache.model_version(bigger))
    assert first == cache.get_segmenter(weighted).model_version
    time.sleep(0.01)
    weights_file.write_bytes(map_weights_to_bytes({**dict.fromkeys(layers, 1.0), layers[0]: 3.0}))
    assert cache.model_version(weighted) != first  # a retrained weights file is picked up
    assert cache.get_segmenter(weighted).config.map_weights[layers[0]] == 3.0


# ---------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "relative", ["../x.png", "/etc/passwd", "a/../../x.png", "C:/x.png", "..\\x.png", "."]
)
def test_local_paths_that_leave_the_root_are_refused(images_root, relative):
    with pytest.raises(ImageError, match="refused"):
        safe_local_path(images_root, relative)


def test_symlinks_are_followed_only_inside_the_root(images_root):
    assert safe_local_path(images_root, "imgs/inside.png") == (images_root / "imgs/a.png")
    with pytest.raises(ImageError, match="leads outside"):
        safe_local_path(images_root, "imgs/escape.png")


def test_tokens_jwt_is_bearer_after_refresh_and_legacy_is_token(web, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # a proxy would see the token: unused
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert is_jwt(REFRESH_TOKEN) and is_jwt(ACCESS_TOKEN) and not is_jwt(LEGACY_TOKEN)
    assert LabelStudioAuth(web, LEGACY_TOKEN).header() == {"Authorization": f"Token {LEGACY_TOKEN}"}
    assert LabelStudioAuth(web, ACCESS_TOKEN).header() == {
        "Authorization": f"Bearer {ACCESS_TOKEN}"
    }
    assert LabelStudioAuth(web, REFRESH_TOKEN).header() == {
        "Authorization": f"Bearer {ACCESS_TOKEN}"
    }
    with pytest.raises(ImageError, match="refused LABEL_STUDIO_API_KEY"):
        LabelStudioAuth(web, jwt({"token_type": "refresh", "user": "other"})).header()


@pytest.mark.parametrize("token", [LEGACY_TOKEN, REFRESH_TOKEN])
def test_label_studio_files_are_fetched_with_the_api_key(settings, web, token):
    env = replace(settings, label_studio_url=web, label_studio_api_key=token)
    loader = ImageLoader(replace(env, local_files_document_root=None))
    FakeLabelStudio.seen_auth.clear()
    upload = loader.load("/data/upload/1/up.png")
    assert upload.size == (20, 30)
    assert loader.load("upload/1/up.png").size == (20, 30)
    assert loader.load(_local("imgs/a.png")).size == (20, 30)  # through the server
    assert loader.load(f"{web}/data/upload/1/up.png").size == (20, 30)
    assert loader.load("s3://bucket/pic.png", task_id=5).size == (31, 22)  # presigned
    expected = f"Token {token}" if token == LEGACY_TOKEN else f"Bearer {ACCESS_TOKEN}"
    assert FakeLabelStudio.seen_auth == [expected] * 5
    assert loader.load(f"{web}/web/pic.png").size == (31, 22)  # plain web: no key sent
    assert len(FakeLabelStudio.seen_auth) == 5
    wrong = ImageLoader(replace(env, label_studio_api_key="wrong"))
    with pytest.raises(ImageError, match=r"refused LABEL_STUDIO_API_KEY \(HTTP 401\)"):
        wrong.load("/data/upload/1/up.png")


# ---------------------------------------------------------------------- auth, webhooks, serve
def test_basic_auth_guards_every_route(settings):
    secured = replace(settings, basic_auth_user="ls", basic_auth_pass="s3cret")
    client = create_app(secured).test_client()
    try:

        def header(user: str, password: str) -> dict:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {token}"}

        assert client.get("/health").status_code == 401
        assert client.get("/health").headers["WWW-Authenticate"].startswith("Basic")
        assert client.get("/health", headers=header("ls", "wrong")).status_code == 401
        assert client.post("/predict", json={"tasks": []}).status_code == 401
        assert client.get("/health", headers=header("ls", "s3cret")).status_code == 200
        response = client.post("/setup", json={"schema": CONFIG}, headers=header("ls", "s3cret"))
        assert response.status_code == 200
    finally:
        create_app(settings)
    assert client.get("/health").status_code == 200


def test_webhooks_are_acknowledged(client):
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert response.status_code == 201 and response.get_json()["status"] == "ok"
    assert client.post("/webhook", json={"project": {}}).status_code == 400


def test_start_training_without_label_studio_says_so(client):
    payload = {"action": "START_TRAINING", "project": {"id": 4, "label_config": CONFIG}}
    response = client.post("/webhook", json=payload)
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "error" and "LABEL_STUDIO_URL" in body["detail"]
    assert "LABEL_STUDIO_API_KEY" in body["detail"]
    bad_config = {"action": "START_TRAINING", "project": {"id": 4, "label_config": "<View/>"}}
    response = client.post("/webhook", json=bad_config)
    assert response.status_code == 400 and "BrushLabels" in response.get_json()["detail"]


def test_start_training_refines_once_per_project_and_predictions_use_the_weights(
    settings, tmp_path, web
):
    """The older /train call: a real refine run (tiny model, resnet18, one epoch) on the tasks
    Label Studio lists for the project; the tasks in the request are ignored."""
    from labeler.jobs.refine.threaded import get_background_refine

    refine = replace(
        settings,
        label_studio_url=web,
        label_studio_api_key=LEGACY_TOKEN,
        refine_dir=str(tmp_path / "runs"),
        student=StudentConfig(encoder="resnet18", encoder_weights=None, epochs=1, crop_size=64),
    )
    client = create_app(refine).test_client()
    names = ["a.png", "sub dir/b #1.png", "c.png", "exif.jpg"]
    tasks = [
        {"id": i, "data": {"image": image_url("/data/local-files/?d=imgs", name)}}
        for i, name in enumerate(names)
    ]
    FakeLabelStudio.project_tasks["21"] = tasks
    setup = client.post("/setup", json={"schema": CONFIG, "project": "21.1700000000"})
    before = setup.get_json()["model_version"]
    sent = [_task(99, "http://198.51.100.7/not-fetched.png")]  # ignored: tasks come from LS
    body = {"annotations": sent, "project": "21.1700000000", "label_config": CONFIG}
    first = client.post("/train", json=body)
    assert first.status_code == 201 and first.get_json()["status"] == "started", first.get_json()
    again = client.post("/train", json=body).get_json()
    assert again["status"] in ("already_running", "started")
    assert client.get("/is_training?project=21.1").get_json()["is_training"] in (True, False)
    handle = get_background_refine("21")
    assert handle.wait(timeout=300), "the refine run did not end in 5 minutes"
    assert handle.status == "finished", handle.error
    assert client.get("/is_training?project=21.1").get_json()["is_training"] is False
    assert handle.weights_path is not None and handle.weights_path.exists()
    assert len(list((handle.work_dir / "pool").glob("*.png"))) == len(tasks)

    # The project's next /predict and /setup carry the learned weights: a new model_version.
    after = client.post("/setup", json={"schema": CONFIG, "project": "21.1700000000"})
    assert after.get_json()["model_version"] != before
    response = client.post(
        "/predict", json={"tasks": tasks[:1], "label_config": CONFIG, "project": "21.1700000000"}
    ).get_json()
    assert response["model_version"] == after.get_json()["model_version"]
    assert response["results"][0], "the refined model still predicts"
    # Another project keeps the plain model.
    other = client.post("/setup", json={"schema": CONFIG, "project": "22.1700000000"})
    assert other.get_json()["model_version"] == before


def test_versions_answers_get_and_post(client, settings):
    version = cache.model_version(settings)
    assert client.get("/versions").get_json()["versions"] == [version]
    assert client.post("/versions", json={"project": "1.1"}).get_json()["versions"] == [version]


def test_serve_help_and_option_errors():
    from labeler.commands.serve import serve

    runner = CliRunner()
    result = runner.invoke(serve, ["--help"])
    assert result.exit_code == 0
    for option in ("--model", "--device", "--host", "--port", "--workers", "--basic-auth-user"):
        assert option in result.output
    result = runner.invoke(serve, ["--basic-auth-user", "u"], env={"BASIC_AUTH_PASS": ""})
    assert result.exit_code == 2 and "BASIC_AUTH_PASS" in result.output


def test_cli_help_does_not_import_torch():
    code = (
        "import sys, runpy; sys.argv = ['cli.py', 'serve', '--help']\n"
        "try:\n    runpy.run_path('cli.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'flask' not in sys.modules, 'heavy import'\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--basic-auth-user" in done.stdout
