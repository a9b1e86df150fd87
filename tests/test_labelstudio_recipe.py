"""The Label Studio recipe of docs/label-studio.md, run as written against a real Label Studio
1.23; then, on the server it leaves running, ``stableseg label-studio predict`` killed halfway
and rerun, free-text prompts, and the task scores a review sorts by.

``docs/label-studio-recipe.sh`` is the recipe (docs/label-studio.md shows its steps verbatim):
it starts Label Studio with the variables local files and a backend on the same machine need,
gets a personal access token with curl, starts the backend with the demo model, makes a project
with a Local Files storage of the demo scenes, connects the model, gets predictions for ten
tasks through Label Studio and for the rest with ``stableseg label-studio predict``, and lists
the least confident tasks. It runs once here, in a temporary folder on free ports; the module's
other tests reuse its server and backend (a Label Studio start costs half a minute).

Both the backend and the CLI run with batch size 1 (``STABLESEG_BATCH_SIZE``, which ``serve``
and ``label-studio predict`` both read; the recipe itself keeps the default): StableSeg's
floats, and so a few pixels at near-ties, depend on which images share a UNet batch, and the
masks are compared pixel for pixel with ``pseudo-label --batch-size 1``.

Skipped, loudly, only where Label Studio cannot be installed; set STABLESEG_REQUIRE_LABEL_STUDIO=1
to fail instead.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import requests
from PIL import Image

from demo.scenes import make_scene
from exporters import decode_brush_result, png_to_mask, task_score

from . import labelstudio_server as lss
from .support import local_http_server

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "docs" / "label-studio-recipe.sh"
SCENES = ROOT / "demo" / "scenes"
COLOURS = (SCENES / "colours.txt").read_text().split()  # red, green, blue, yellow
RECIPE_TIMEOUT_S = 900
CLI_TIMEOUT_S = 600
VARIABLES_LEFT_OUT = ("LABEL_STUDIO_", "LOCAL_FILES_", "STABLESEG_", "BASIC_AUTH_", "MODEL_DIR")


@dataclass
class Recipe:
    """What the recipe left running, and how to reach it."""

    url: str
    backend: str
    project: int
    output: str
    files: Path
    env: dict[str, str]
    token: str
    api: lss.TokenClient


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recipe]:
    venv = lss.installed_or_skip()
    base = tmp_path_factory.mktemp("recipe")
    files = base / "files"  # FILES_ROOT: what Label Studio may serve
    shutil.copytree(SCENES / "images", files / "scenes" / "images")
    work = base / "work"
    ls_port, backend_port = lss.free_port(), lss.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(VARIABLES_LEFT_OUT)}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        {
            # what `. .venv/bin/activate` does, and the repository on the path
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "VIRTUAL_ENV": str(Path(bin_dir).parent),
            "PYTHONPATH": str(ROOT),
            # the recipe's own settings
            "LS_PORT": str(ls_port),
            "BACKEND_PORT": str(backend_port),
            "WORK": str(work),
            "FILES_ROOT": str(files),
            "LS_PASSWORD": "recipe-test-password",
            "LABEL_STUDIO_VENV": str(venv),
            # deterministic masks (see the module's docstring); no reports to the internet
            "STABLESEG_BATCH_SIZE": "1",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false",
        }
    )
    # One JWT signing key for the server the recipe starts and the shell that mints the tests'
    # token: left unset, Label Studio's processes may each write their own key into its data
    # folder, and the token is then "invalid" for the server (see labelstudio_server.label_studio).
    secret_key = secrets.token_urlsafe(50)
    env["SECRET_KEY"] = secret_key
    log = base / "recipe.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", str(RECIPE)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            code: int | None = process.wait(timeout=RECIPE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        output = log.read_text(errors="replace")
        if code != 0:
            pytest.fail(
                f"the recipe failed (exit {code}):\n{output[-4000:]}\n"
                f"--- Label Studio log ---\n{lss.tail(work / 'label-studio.log')}\n"
                f"--- backend log ---\n{lss.tail(work / 'backend.log')}"
            )
        found = re.search(r"^project (\d+): open ", output, re.MULTILINE)
        assert found, output[-3000:]
        url = f"http://127.0.0.1:{ls_port}"
        token = lss.mint_personal_token(venv, work / "label-studio-data", secret_key)
        yield Recipe(
            url=url,
            backend=f"http://127.0.0.1:{backend_port}",
            project=int(found.group(1)),
            output=output,
            files=files,
            env=env,
            token=token,
            api=lss.TokenClient(url, token),
        )
    finally:
        lss.stop_group(process.pid)


# ---------------------------------------------------------------------- helpers
def _decode(prediction: dict, labels: list[str], shape: tuple[int, int]) -> np.ndarray:
    """A prediction's brush results -> one (H, W) id mask (0 = unpainted; a prediction with no
    region, an image where nothing was found, is all 0)."""
    mask = np.zeros(shape, np.uint8)
    for region in prediction["result"]:
        painted = decode_brush_result(region)
        assert painted.shape == shape
        assert not (painted & (mask > 0)).any(), "brush regions overlap"
        mask[painted] = labels.index(region["value"]["brushlabels"][0]) + 1
    return mask


def _pseudo_label(images: Path, labels: list[str], out: Path) -> Path:
    """``cli.py pseudo-label`` with the recipe's settings and batch size 1: the masks folder."""
    command = [
        sys.executable,
        "cli.py",
        "pseudo-label",
        str(images),
        "--labels",
        ",".join(labels),
        "--model",
        "demo/model",
        "--image-size",
        "64",
        "--background-prompt",
        "background",
        "--batch-size",
        "1",
        "--format",
        "png",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, f"pseudo-label failed:\n{done.stderr[-4000:]}"
    return out / "masks"


def _cli_mask(masks: Path, name: str) -> np.ndarray:
    with Image.open(masks / name) as png:
        return png_to_mask(png)


def _new_project(recipe: Recipe, title: str, config: str, folder: Path, regex: str) -> int:
    """A project with a Local Files storage of ``folder`` (files matching ``regex``), synced."""
    api = recipe.api
    project = api.post("/api/projects", json={"title": title, "label_config": config})["id"]
    storage = api.post(
        "/api/storages/localfiles",
        json={
            "project": project,
            "title": title,
            "path": str(folder),
            "regex_filter": regex,
            "use_blob_urls": True,
        },
    )
    api.post(f"/api/storages/localfiles/{storage['id']}/sync")
    return int(project)


def _brush_config(labels: list[str], extra: str = "") -> str:
    return (
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        + "".join(f'<Label value="{label}"/>' for label in labels)
        + f"</BrushLabels>{extra}</View>"
    )


def _predicted_count(api: lss.TokenClient, project: int) -> int:
    tasks = api.tasks(project, include="id,total_predictions")
    return sum(1 for task in tasks if task["total_predictions"] > 0)


# ---------------------------------------------------------------------- the recipe
def test_the_recipe_pre_annotates_every_demo_scene(recipe: Recipe, tmp_path: Path) -> None:
    api = recipe.api
    version = requests.get(f"{recipe.backend}/versions", timeout=30).json()["versions"][0]
    tasks = sorted(api.tasks(recipe.project, fields="all"), key=lambda t: t["id"])
    scenes = sorted(p.name for p in (SCENES / "images").glob("*.png"))
    assert sorted(Path(t["storage_filename"]).name for t in tasks) == scenes
    for task in tasks:  # one prediction each: the CLI skipped what Label Studio had predicted
        assert [p["model_version"] for p in task["predictions"]] == [version], task["id"]
        prediction = task["predictions"][0]
        if prediction["result"]:  # the mean confidence of the painted pixels
            assert 0.0 < prediction["score"] <= 1.0, task["id"]
        else:  # nothing painted: the least confident task of all
            assert prediction["score"] == 0.0, task["id"]
    masks = {}
    for task in tasks:
        name = Path(task["storage_filename"]).name
        with Image.open(SCENES / "images" / name) as image:
            shape = (image.height, image.width)
        masks[name] = _decode(task["predictions"][0], COLOURS, shape)

    # Right masks: the demo's colours painted in their colour, the grey backdrop unpainted
    # (the shipped scenes' ground truth; the demo model reaches about 0.65 IoU a colour).
    kept, inter, union = [], np.zeros(5), np.zeros(5)
    for name, mask in masks.items():
        truth = np.asarray(Image.open(SCENES / "masks" / name))
        kept.append(((mask == 0) & (truth == 0)).sum() / max((truth == 0).sum(), 1))
        for k in range(1, 5):
            inter[k] += ((mask == k) & (truth == k)).sum()
            union[k] += ((mask == k) | (truth == k)).sum()
    assert np.mean(kept) > 0.9, f"backdrop unpainted on only {np.mean(kept):.0%}"
    iou = dict(zip(COLOURS, (inter[1:] / union[1:]).round(3), strict=True))
    assert min(iou.values()) > 0.5, iou

    # Pixel for pixel what pseudo-label writes: the first ten tasks came through Label Studio
    # and the backend, the others from `stableseg label-studio predict`.
    names = [Path(t["storage_filename"]).name for t in tasks]
    chosen = names[:5] + names[10:15]
    subset = tmp_path / "images"
    subset.mkdir()
    for name in chosen:
        shutil.copy(SCENES / "images" / name, subset / name)
    reference = _pseudo_label(subset, COLOURS, tmp_path / "cli")
    for name in chosen:
        np.testing.assert_array_equal(masks[name], _cli_mask(reference, name), err_msg=name)

    # The review step printed the five least confident tasks, lowest first.
    printed = [
        float(s) for s in re.findall(r"^(\d\.\d{3})  \S+scene_\d+\.png$", recipe.output, re.M)
    ]
    lowest = sorted(t["predictions"][0]["score"] for t in tasks)[:5]
    assert printed == pytest.approx(lowest, abs=1e-3)


def test_task_scores_are_stored_and_sort_the_data_manager(recipe: Recipe) -> None:
    api = recipe.api
    tasks = api.tasks(recipe.project, include="id")
    weighted_differs = False
    for task in tasks[:20]:
        stored = api.get(f"/api/tasks/{task['id']}")["predictions"][0]
        if not stored["result"]:  # nothing painted: score 0 (checked in the recipe test)
            continue
        first = stored["result"][0]
        shape = (first["original_height"], first["original_width"])
        mask = _decode(stored, COLOURS, shape)
        scores = {r["value"]["brushlabels"][0]: r["score"] for r in stored["result"]}
        # the task score is the labels' scores weighted by their painted pixels
        assert stored["score"] == pytest.approx(task_score(mask, COLOURS, scores), abs=1e-6)
        weighted_differs |= abs(stored["score"] - np.mean(list(scores.values()))) > 1e-3
        listed = api.get("/api/predictions", params={"task": task["id"]})
        assert [p["score"] for p in listed] == [stored["score"]]
    assert weighted_differs, "no task where pixel weighting changes the score: a weak check"
    # The project's model version is the predictions' (the recipe's prelabel step), so the
    # Data Manager's "Prediction score" column has values and sorts by them.
    ordered = api.get(
        "/api/tasks",
        params={
            "project": recipe.project,
            "page_size": 100,
            "include": "id,predictions_score",
            "query": '{"ordering": ["tasks:predictions_score"]}',
        },
    )["tasks"]
    column = [t["predictions_score"] for t in ordered]
    assert None not in column and column == sorted(column)


# ---------------------------------------------------------------------- label-studio predict
def _predict_command(recipe: Recipe, project: int, *extra: str) -> list[str]:
    return [
        shutil.which("stableseg", path=recipe.env["PATH"]) or "stableseg",
        "label-studio",
        "predict",
        "--url",
        recipe.url,
        "--project",
        str(project),
        "--model",
        str(ROOT / "demo" / "model"),  # the same folder, so the same model version
        "--background-prompt",
        "background",
        *extra,
    ]


def test_label_studio_predict_killed_halfway_and_rerun_predicts_each_task_once(
    recipe: Recipe, tmp_path: Path
) -> None:
    folder = recipe.files / "generated"
    folder.mkdir()
    count = 30
    for index in range(count):
        Image.fromarray(make_scene(seed=7, index=index).image).save(folder / f"g_{index:02d}.png")
    project = _new_project(recipe, "kill and rerun", _brush_config(COLOURS), folder, r".*\.png")
    env = {
        **recipe.env,
        "LABEL_STUDIO_API_KEY": recipe.token,
        "LOCAL_FILES_DOCUMENT_ROOT": str(recipe.files),
    }
    # 128 px and one task an upload: slow enough to be caught halfway on two CPU cores
    command = _predict_command(
        recipe, project, "--image-size", "128", "--batch-size", "1", "--upload-batch", "1"
    )
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while _predicted_count(recipe.api, project) < 3:
            assert first.poll() is None, f"the run ended first:\n{lss.tail(log)}"
            assert time.monotonic() < deadline, f"no uploads:\n{lss.tail(log)}"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        lss.stop_group(first.pid)
    killed_at = _predicted_count(recipe.api, project)
    assert 3 <= killed_at < count, f"not halfway: {killed_at} of {count} predicted"

    second = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"predicted {count - killed_at}, skipped {killed_at} " in second.stderr
    tasks = recipe.api.tasks(project, fields="all")
    assert len(tasks) == count
    versions = {p["model_version"] for t in tasks for p in t["predictions"]}
    assert len(versions) == 1, versions
    assert all(len(t["predictions"]) == 1 for t in tasks), [
        (t["id"], len(t["predictions"])) for t in tasks if len(t["predictions"]) != 1
    ]
    assert not (tmp_path / f"stableseg-failed-project-{project}.jsonl").exists()


def test_label_studio_predict_refuses_a_wrong_key_or_project_with_a_usage_error(
    recipe: Recipe, tmp_path: Path
) -> None:
    env = {**recipe.env, "LABEL_STUDIO_API_KEY": "0123456789abcdef0123456789abcdef01234567"}
    done = subprocess.run(
        _predict_command(recipe, recipe.project, "--retries", "0"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "refused LABEL_STUDIO_API_KEY" in done.stderr
    env["LABEL_STUDIO_API_KEY"] = recipe.token
    done = subprocess.run(
        _predict_command(recipe, 999, "--retries", "0"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "has no project 999" in done.stderr


# ---------------------------------------------------------------------- free-text prompts
FREE_TEXT_CONFIG = (  # Label Studio accepts our attributes: a label's prompt, backgroundPrompt
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Car" prompt="car"/><Label value="Sky"/></BrushLabels>'
    '<TextArea name="prompt" toName="image" editable="true" rows="1" showSubmitButton="true" '
    'backgroundPrompt="background" placeholder="Car: red car"/></View>'
)


def test_a_free_text_prompt_through_label_studio_paints_the_phrase_under_its_label(
    recipe: Recipe, tmp_path: Path
) -> None:
    api = recipe.api
    scene = "scene_005.png"  # a red object on the grey backdrop
    folder = recipe.files / "scenes" / "images"
    project = _new_project(recipe, "free text", FREE_TEXT_CONFIG, folder, re.escape(scene))
    backend = api.post(
        "/api/ml",
        json={
            "project": project,
            "title": "StableSeg",
            "url": recipe.backend,
            "is_interactive": True,
        },
    )
    task = api.tasks(project, include="id")[0]["id"]

    # What Label Studio's labeling page posts when, with Auto-Annotation on, the annotator
    # submits the TextArea: the TextArea's serialized result as the context (see
    # ml_backend.free_text). Label Studio forwards it to the backend's /predict.
    def ask(text: str) -> dict:
        result = {
            "id": "Kf3_prompt",
            "from_name": "prompt",
            "to_name": "image",
            "type": "textarea",
            "origin": "manual",
            "value": {"text": [text]},
        }
        body = {"task": task, "context": {"result": [result]}}
        return api.post(f"/api/ml/{backend['id']}/interactive-annotating", json=body)

    reply = ask("Car: red")
    regions = reply["data"]["result"]
    assert [r["value"]["brushlabels"] for r in regions] == [["Car"]]
    painted = decode_brush_result(regions[0])
    # The phrase against "background", as `pseudo-label --labels red --background-prompt
    # background` paints it, pixel for pixel; and close to the scene's red object.
    single = tmp_path / "images"
    single.mkdir()
    shutil.copy(folder / scene, single / scene)
    expected = _cli_mask(_pseudo_label(single, ["red"], tmp_path / "cli"), scene) == 1
    np.testing.assert_array_equal(painted, expected)
    truth = np.asarray(Image.open(SCENES / "masks" / scene)) == COLOURS.index("red") + 1
    assert (painted & truth).sum() / (painted | truth).sum() > 0.5
    assert reply["data"]["score"] == pytest.approx(regions[0]["score"])

    # A phrase that names no label, with two labels to choose from: what to type comes back as
    # a suggestion on the TextArea, the one thing of a reply Label Studio's labeling page shows
    # (an HTTP error would reach it as "400 Client Error" only; see ml_backend.free_text).
    refused = ask("red car")
    [message] = refused["data"]["result"]
    assert message["type"] == "textarea" and message["from_name"] == "prompt"
    assert "'Car: red car'" in message["value"]["text"][0]


class _LosesTheFirstUpload(BaseHTTPRequestHandler):
    """A proxy to Label Studio that forwards everything, but answers the first prediction upload
    with a 502 after Label Studio has stored it: the client cannot know it was stored."""

    upstream = ""
    lost: ClassVar[list[str]] = []

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        answer = requests.request(
            self.command, self.upstream + self.path, headers=headers, data=body, timeout=120
        )
        if self.command == "POST" and "/import/predictions" in self.path and not self.lost:
            self.lost.append(self.path)
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(answer.status_code)
        for key in ("Content-Type",):
            if key in answer.headers:
                self.send_header(key, answer.headers[key])
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = do_PATCH = _forward

    def log_message(self, *args: object) -> None:
        pass


def test_an_upload_lost_after_label_studio_stored_it_is_not_stored_twice(
    recipe: Recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labeler.model_settings import ModelSettings
    from labeler.settings import build
    from ml_backend.project import PredictOptions, run_predict

    folder = recipe.files / "scenes" / "images"
    project = _new_project(
        recipe, "lost upload", _brush_config(COLOURS), folder, r"scene_00[0-5]\.png"
    )
    _LosesTheFirstUpload.upstream = recipe.url
    _LosesTheFirstUpload.lost = []
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(recipe.files))
    settings = build(
        ModelSettings,
        {
            "model": str(ROOT / "demo" / "model"),
            "device": "cpu",
            "image_size": 64,
            "batch_size": 2,
            "background_prompt": "background",
        },
    )
    with local_http_server(_LosesTheFirstUpload) as proxy_url:
        options = PredictOptions(
            url=proxy_url,
            project=project,
            api_key=recipe.token,
            settings=settings,
            upload_batch=4,
            retries=2,
        )
        summary = run_predict(options)
    assert _LosesTheFirstUpload.lost, "the proxy never lost an upload"
    assert (summary.done, summary.skipped, summary.failed) == (6, 0, [])
    tasks = recipe.api.tasks(project, fields="all")
    assert sorted(len(t["predictions"]) for t in tasks) == [1] * 6


def test_a_prediction_label_studio_refuses_fails_alone_with_its_reason(recipe: Recipe) -> None:
    from labeler.jobs.io import Failure
    from labeler.model_settings import ModelSettings
    from ml_backend.project import PredictOptions, Uploader, connect

    folder = recipe.files / "scenes" / "images"
    project = _new_project(recipe, "refused", _brush_config(COLOURS), folder, r"scene_01[0-2]\.png")
    ids = [t["id"] for t in recipe.api.tasks(project, include="id")]
    options = PredictOptions(
        url=recipe.url,
        project=project,
        api_key=recipe.token,
        settings=ModelSettings(),
        upload_batch=10,
    )
    done: list[int] = []
    failed: list[Failure] = []
    uploader = Uploader(
        connect(recipe.url, recipe.token, 60), options, "v-test", done.append, failed.append
    )
    empty = {"model_version": "v-test", "score": 0.5, "result": []}
    for task_id in [ids[0], 10**9, *ids[1:]]:  # 10**9: no such task in the project
        uploader.add(task_id, empty)
    uploader.flush()
    assert sorted(done) == sorted(ids)
    assert [f.item for f in failed] == [10**9] and "upload refused" in failed[0].reason
    assert uploader.requests == 1 + len(ids) + 1  # the batch, then each prediction alone
    stored = recipe.api.tasks(project, include="id,total_predictions")
    assert [t["total_predictions"] for t in stored] == [1] * len(ids)
