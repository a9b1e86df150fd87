"""The backend's limits and its behaviour towards callers it cannot trust (issue 10).

Most cases run against real ``python cli.py serve`` processes on loopback (gunicorn with the
backend's worker class, or the development server), on the tiny random Stable Diffusion, with
a small stand-in for Label Studio's API on loopback. Every loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from labeler.jobs.io import image_bytes
from labeler.model_settings import ModelSettings, ModelSpec, SegmenterConfig
from ml_backend.backend_settings import BackendSettings
from ml_backend.label_config import LabelConfigError, parse_label_config
from ml_backend.server import create_app
from ml_backend.serving import exposure_warning, is_loopback
from ml_backend.training import parse_project_id

from . import labelstudio_server as lss
from .conftest import TINY_SIZE
from .support import local_http_server

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef0123456789abcdef01234567"
AUTH = ("ls", "s3cret-pass")
START_S = 120  # a serve process answers /health within this (tiny model, 2 busy cores)
REQUEST_TIMEOUT_S = 4  # STABLESEG_REQUEST_TIMEOUT of the test servers
MAX_BODY = 200_000  # STABLESEG_MAX_BODY_BYTES of the test servers
MAX_TASKS = 8  # STABLESEG_MAX_TASKS of the test servers
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="cat"/><Label value="dog"/></BrushLabels></View>'
)


def _config_with_labels(count: int) -> str:
    labels = "".join(f'<Label value="class {i}"/>' for i in range(count))
    return (
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        f"{labels}</BrushLabels></View>"
    )


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return image_bytes(Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)))


# ---------------------------------------------------------------------- Label Studio stand-in
class FakeLabelStudio(BaseHTTPRequestHandler):
    """``GET /api/tasks?project=ID`` and ``/data/upload/...`` behind the API key."""

    images: ClassVar[dict[str, bytes]] = {f"/data/upload/1/{i}.png": _png(i) for i in range(3)}
    hits: ClassVar[list[str]] = []  # shared by the handler threads on purpose

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            return self._send(401, b"unauthorised", "text/plain")
        if self.path.startswith("/api/tasks?"):
            project = parse_qs(urlsplit(self.path).query)["project"][0]
            tasks = [
                {"id": int(project) * 100 + i, "data": {"image": path}}
                for i, path in enumerate(sorted(self.images))
            ]
            body = json.dumps({"tasks": tasks, "total": len(tasks)}).encode()
            return self._send(200, body, "application/json")
        if self.path in self.images:
            return self._send(200, self.images[self.path], "image/png")
        return self._send(404, b"not found", "text/plain")


@pytest.fixture(scope="module")
def label_studio() -> Iterator[str]:
    with local_http_server(FakeLabelStudio) as url:
        yield url


# ---------------------------------------------------------------------- serve processes
@dataclass
class Served:
    url: str
    port: int
    process: subprocess.Popen
    log: Path
    refine_dir: Path

    def worker_pids(self) -> list[int]:
        """The gunicorn workers (children of the master, which ``serve`` exec'd into)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    pids.append(int(entry.name))
        return sorted(pids)

    def rss_kb(self) -> int:
        """Resident memory of the processes that answer requests (the workers, or the dev
        server itself), from /proc/PID/status."""
        total = 0
        for pid in self.worker_pids() or [self.process.pid]:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total


@pytest.fixture(scope="module")
def images_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("files")
    (root / "a.png").write_bytes(_png(7))
    return root


def _serve(
    workspace: Path,
    model_dir: Path,
    images_root: Path,
    label_studio: str,
    *options: str,
    env: dict[str, str] | None = None,
    auth: tuple[str, str] | None = None,
) -> Iterator[Served]:
    port = lss.free_port()
    refine_dir = workspace / "refine"
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "LABEL_STUDIO_URL": label_studio,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "LOCAL_FILES_DOCUMENT_ROOT": str(images_root),
        "STABLESEG_REFINE_DIR": str(refine_dir),
        "STABLESEG_REFINE_ENCODER": "resnet18",
        "STABLESEG_REFINE_ENCODER_WEIGHTS": "none",
        "STABLESEG_REFINE_EPOCHS": "1",
        "STABLESEG_REFINE_CROP_SIZE": "64",
        "STABLESEG_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S),
        "STABLESEG_MAX_BODY_BYTES": str(MAX_BODY),
        "STABLESEG_MAX_TASKS": str(MAX_TASKS),
        **(env or {}),
    }
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        environment.pop(name, None)
    command = [sys.executable, "cli.py", "serve", "--model", str(model_dir), "--device", "cpu"]
    command += ["--image-size", str(TINY_SIZE), "--batch-size", "2", "--port", str(port)]
    if auth:
        command += ["--basic-auth-user", auth[0], "--basic-auth-pass", auth[1]]
    command += list(options)
    log = workspace / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        lss.wait_for(f"{url}/health", START_S, process, "serve", auth=auth)
        yield Served(url, port, process, log, refine_dir)
    except BaseException:
        sys.stderr.write(f"--- serve log (end) ---\n{lss.tail(log)}\n")
        raise
    finally:
        lss.stop(process, timeout=5)  # then SIGKILL: torch processes exit slowly


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, images_root, label_studio) -> Iterator[Served]:
    """gunicorn with two workers of two threads, behind basic auth (one server for these
    tests: each start costs seconds)."""
    workspace = tmp_path_factory.mktemp("serve")
    options = ("--workers", "2", "--threads", "2")
    yield from _serve(workspace, tiny_model_dir, images_root, label_studio, *options, auth=AUTH)


def _post(server: Served, path: str, **kwargs) -> requests.Response:
    """POST on a fresh connection (so gunicorn may give it to either worker)."""
    kwargs.setdefault("timeout", 30)
    kwargs.setdefault("auth", AUTH)
    return requests.post(f"{server.url}{path}", headers={"Connection": "close"}, **kwargs)


def _get(server: Served, path: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", auth=AUTH, timeout=10)


def _raw(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes; the status and JSON body of the answer (the connection may be closed
    by the server right after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read() or b"{}")


def _head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


def _basic(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


TASK = {"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}


# ---------------------------------------------------------------------- auth and bodies
def test_auth_comes_before_the_body_and_the_body_limit_before_reading(server):
    """200 MB announced and never sent: answered at once, so nothing waited to read it."""
    before = server.rss_kb()
    started = time.monotonic()
    status, body = _raw(server.port, _head("/predict", "Content-Length: 200000000"))
    assert status == 401 and body["detail"] == "basic authentication required"
    wrong = _head("/predict", "Content-Length: 200000000", _basic(AUTH[0], "no"))
    assert _raw(server.port, wrong)[0] == 401
    right = _head("/predict", "Content-Length: 200000000", _basic(*AUTH))
    status, body = _raw(server.port, right)
    assert status == 413 and "STABLESEG_MAX_BODY_BYTES" in body["detail"]
    assert time.monotonic() - started < 5
    chunk = b"x" * 50_000  # chunked, no length: read up to the limit, then refused
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    head = _head("/predict", "Transfer-Encoding: chunked", _basic(*AUTH))
    status, body = _raw(server.port, head, chunked)
    assert status == 413 and "STABLESEG_MAX_BODY_BYTES" in body["detail"]
    assert (server.rss_kb() - before) / 1024 < 50
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 401
    assert _get(server, "/health").status_code == 200


def test_a_body_that_trickles_is_cut_at_the_deadline(server):
    started = time.monotonic()  # 11 of 100 bytes, then nothing
    head = _head("/predict", "Content-Length: 100", _basic(*AUTH))
    status, body = _raw(server.port, head, b'{"tasks": [')
    assert status == 408 and "STABLESEG_REQUEST_TIMEOUT" in body["detail"]
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 3


def test_multipart_bodies_are_never_parsed(server):
    files = {"file": ("big.bin", b"\0" * 150_000, "application/octet-stream")}
    response = _post(server, "/predict", files=files)
    assert response.status_code == 400 and "JSON object" in response.json()["detail"]


# ---------------------------------------------------------------------- bounded work
def test_two_thousand_labels_get_a_quick_4xx_with_flat_memory(server):
    config = _config_with_labels(2000)
    _get(server, "/health")
    before = server.rss_kb()
    for _ in range(3):
        started = time.monotonic()
        response = _post(server, "/predict", json={"tasks": [TASK], "label_config": config})
        assert time.monotonic() - started < 5
        assert response.status_code == 400
        assert "STABLESEG_MAX_LABELS" in response.json()["detail"]
        assert _post(server, "/setup", json={"schema": config}).status_code == 400
    grown_mb = (server.rss_kb() - before) / 1024
    assert grown_mb < 50, f"RSS grew by {grown_mb:.0f} MB"
    assert _post(server, "/setup", json={"schema": _config_with_labels(254)}).status_code == 200


def test_requests_past_a_limit_or_malformed_get_json_4xx(server):
    too_many = _post(
        server, "/predict", json={"tasks": [TASK] * (MAX_TASKS + 1), "label_config": CONFIG}
    )
    assert too_many.status_code == 413
    assert "STABLESEG_MAX_TASKS" in too_many.json()["detail"]
    assert "stableseg label-studio predict" in too_many.json()["detail"]
    cases = {
        "[1, 2]": "JSON object",
        "not json": "JSON object",
        "[" * 100_000 + "]" * 100_000: "nested too deeply",
        json.dumps({"tasks": [TASK], "label_config": 5}): "XML string",
        json.dumps({"tasks": {"id": 1}, "label_config": CONFIG}): "'tasks' must be a list",
        json.dumps({"tasks": [TASK], "label_config": CONFIG, "project": "x"}): "project id",
    }
    for raw, expected in cases.items():
        response = _post(server, "/predict", data=raw)
        assert response.status_code == 400, (raw[:40], response.text[:200])
        assert expected in response.json()["detail"], (raw[:40], response.json())
    assert _post(server, "/webhook", data="[]").status_code == 400
    response = _get(server, "/no-such-page")
    assert response.status_code == 404 and response.json()["status"] == 404
    body = {"tasks": [TASK] * MAX_TASKS, "label_config": CONFIG}
    ok = _post(server, "/predict", json=body, timeout=60)
    assert ok.status_code == 200 and all(r["result"] for r in ok.json()["results"])


def test_every_prediction_succeeds_whichever_worker_answers(server):
    """Nothing depends on which worker got /setup: 12 predictions on fresh connections, images
    from Label Studio's uploads (its URL and key come from the environment only, never from
    /setup's hostname)."""
    assert len(server.worker_pids()) == 2
    setup = {"project": "5.1700000000", "schema": CONFIG, "hostname": "http://198.51.100.9"}
    assert _post(server, "/setup", json=setup).status_code == 200
    task = {"id": 51, "data": {"image": "/data/upload/1/0.png"}}
    body = {"tasks": [task], "label_config": CONFIG, "project": "5.1700000000"}
    for _ in range(12):
        response = _post(server, "/predict", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["errors"] == [] and response.json()["results"][0]["result"]


def test_fifty_concurrent_predictions_are_all_answered_with_flat_memory(server):
    body = {"tasks": [TASK], "label_config": CONFIG, "project": "9.1"}
    with requests.Session() as session:  # kept alive: the next heads go through the worker too
        for _ in range(4):
            response = session.post(f"{server.url}/predict", json=body, auth=AUTH, timeout=60)
            assert response.ok
    before = server.rss_kb()
    statuses: list[int] = []

    def post() -> None:
        response = requests.post(f"{server.url}/predict", json=body, auth=AUTH, timeout=120)
        statuses.append(response.status_code if response.json()["results"][0] else -1)

    threads = [threading.Thread(target=post) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    assert statuses == [200] * 50
    grown_mb = (server.rss_kb() - before) / 1024
    assert grown_mb < 100, f"RSS grew by {grown_mb:.0f} MB"


# ---------------------------------------------------------------------- slow clients
def test_health_answers_while_eight_connections_send_their_headers_slowly(server):
    """Eight clients send a request head at one byte a second: /health still answers within
    2 s (twice the threads of both workers together), and the server closes them
    when STABLESEG_REQUEST_TIMEOUT has passed without a complete head."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"y" * 40
    keep_sending = threading.Event()
    keep_sending.set()
    closed_after: list[float] = []
    start = time.monotonic()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            for byte in head:
                if not keep_sending.is_set():
                    break
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break
                time.sleep(1.0)
            sock.settimeout(REQUEST_TIMEOUT_S + 3)
            try:
                if sock.recv(64) != b"":
                    return  # an answer: the head was taken as complete, which it is not
            except TimeoutError:
                return
            except OSError:
                pass
            closed_after.append(time.monotonic() - start)

    slow = [threading.Thread(target=trickle, daemon=True) for _ in range(8)]
    for thread in slow:
        thread.start()
    try:
        time.sleep(1.0)  # every slow connection is open and has sent its first bytes
        for _ in range(3):
            asked = time.monotonic()
            assert requests.get(f"{server.url}/health", auth=AUTH, timeout=2).status_code == 200
            assert time.monotonic() - asked < 2
            time.sleep(0.3)
        assert time.monotonic() - start < REQUEST_TIMEOUT_S  # they were all held meanwhile
    finally:
        keep_sending.clear()
        for thread in slow:
            thread.join(timeout=REQUEST_TIMEOUT_S + 10)
    assert len(closed_after) == 8, closed_after
    assert max(closed_after) < REQUEST_TIMEOUT_S + 3


# ---------------------------------------------------------------------- Start Training
def test_traversal_project_ids_are_refused_and_nothing_is_written(server, tmp_path):
    escape = "../../../../" + str(tmp_path / "x").lstrip("/")
    for project_id in (escape, "0", -3, True, "7/../8"):
        project = {"id": project_id, "label_config": CONFIG}
        response = _post(server, "/webhook", json={"action": "START_TRAINING", "project": project})
        assert response.status_code == 400, response.text
        assert "positive integer" in response.json()["detail"]
    response = _post(server, "/train", json={"project": f"{escape}.1", "label_config": CONFIG})
    assert response.status_code == 400
    body = {"tasks": [TASK], "label_config": CONFIG, "project": "../../x.1"}
    assert _post(server, "/predict", json=body).status_code == 400
    assert not (tmp_path / "x").exists()
    assert not server.refine_dir.exists() or not list(server.refine_dir.glob("project-*"))


def test_start_training_is_one_run_for_the_whole_backend(server):
    """Two projects at the same moment: one run starts, the other gets 409 (nothing queued);
    both workers then see the run (a lock under STABLESEG_REFINE_DIR): the same project answers
    already_running, another one 409. The run lists its tasks from LABEL_STUDIO_URL, loads its
    own model next to the workers' (no "meta tensor" failure) and finishes."""
    FakeLabelStudio.hits.clear()

    def start(project: int) -> requests.Response:
        payload = {"action": "START_TRAINING", "project": {"id": project, "label_config": CONFIG}}
        return _post(server, "/webhook", json=payload)

    replies: dict[int, requests.Response] = {}
    threads = [
        threading.Thread(target=lambda p=p: replies.__setitem__(p, start(p))) for p in (31, 32)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    codes = {p: (r.status_code, r.json()["status"]) for p, r in replies.items()}
    assert sorted(codes.values()) == [(201, "started"), (409, "busy")], codes
    started = next(p for p, code in codes.items() if code[0] == 201)
    busy = next(p for p, code in codes.items() if code[0] == 409)
    assert f"project {started}" in replies[busy].json()["detail"]
    for _ in range(4):
        again, other = start(started), start(busy)
        assert again.status_code == 201 and again.json()["status"] == "already_running"
        assert other.status_code == 409 and f"project {started}" in other.json()["detail"]
        assert _get(server, f"/is_training?project={started}.1").json()["is_training"] is True
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if not _get(server, f"/is_training?project={started}").json()["is_training"]:
            break
        time.sleep(1)
    runs = list(server.refine_dir.glob(f"project-{started}/run-*"))
    assert len(runs) == 1 and not list(server.refine_dir.glob(f"project-{busy}"))
    report = json.loads((runs[0] / "report.json").read_text())
    assert report.get("finished"), lss.tail(server.log)
    assert any(path.startswith(f"/api/tasks?project={started}") for path in FakeLabelStudio.hits)


# ---------------------------------------------------------------------- dev server
def test_the_dev_server_never_runs_the_debugger_and_cuts_slow_clients(
    tmp_path, tiny_model_dir, images_root
):
    """FLASK_DEBUG=1 in the environment: still no debugger (its console runs Python); slow
    clients are cut as under gunicorn."""
    served = _serve(
        tmp_path,
        tiny_model_dir,
        images_root,
        "http://127.0.0.1:9",
        "--dev-server",
        env={"FLASK_DEBUG": "1", "FLASK_ENV": "development"},
    )
    server = next(served)
    try:
        for path in ("/console", "/?__debugger__=yes&cmd=resource&f=debugger.js"):
            response = requests.get(f"{server.url}{path}", timeout=10)
            assert response.headers["Content-Type"] == "application/json", response.text[:200]
        crash = requests.post(f"{server.url}/predict", data="[" * 100_000, timeout=10)
        assert crash.status_code == 400 and crash.headers["Content-Type"] == "application/json"
        _assert_slow_clients_are_cut(server)
    finally:
        served.close()


def _assert_slow_clients_are_cut(server: Served) -> None:
    """A body that stops (408) and a head that stops (connection closed), each within
    STABLESEG_REQUEST_TIMEOUT and a margin."""
    started = time.monotonic()  # 11 of 100 bytes, then nothing
    status, body = _raw(server.port, _head("/predict", "Content-Length: 100"), b'{"tasks": [')
    assert status == 408 and "STABLESEG_REQUEST_TIMEOUT" in body["detail"]
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 3
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S + 6) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
        with contextlib.suppress(ConnectionError):
            while s.recv(4096):  # the server may answer 408 before closing
                pass
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 3


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.org"])
def test_the_dev_server_refuses_a_network_address_without_basic_auth(host):
    from labeler.commands.serve import serve

    env = {"BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": ""}
    result = CliRunner().invoke(serve, ["--dev-server", "--host", host], env=env)
    assert result.exit_code == 2
    assert "basic auth" in result.output and "--basic-auth-user" in result.output


def test_serving_beyond_loopback_without_auth_says_what_is_exposed():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.3.4.5") and not is_loopback("0.0.0.0") and not is_loopback("::")
    for host in ("127.0.0.1", "localhost", "::1"):
        assert exposure_warning(host, basic_auth=False) is None
    assert exposure_warning("0.0.0.0", basic_auth=True) is None
    warning = exposure_warning("0.0.0.0", basic_auth=False)
    assert warning is not None
    for what in ("predictions", "image URL", "allow-list", "Start Training", "BASIC_AUTH_USER"):
        assert what in warning


def test_serve_on_all_interfaces_without_auth_prints_the_warning():
    """The warning comes first, before the settings are checked (a bad one stops it here)."""
    from labeler.commands.serve import serve

    env = {"BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "", "STABLESEG_MAX_LABELS": "300"}
    result = CliRunner().invoke(serve, ["--host", "0.0.0.0"], env=env)
    assert result.exit_code == 2 and "STABLESEG_MAX_LABELS" in result.output
    assert "WARNING: listening on 0.0.0.0 without basic auth" in result.output
    result = CliRunner().invoke(serve, ["--host", "127.0.0.1"], env=env)
    assert result.exit_code == 2 and "WARNING" not in result.output


# ---------------------------------------------------------------------- in-process checks
@pytest.fixture
def client(tiny_model_dir: Path, images_root: Path):
    settings = BackendSettings(
        stableseg=ModelSettings(
            ModelSpec(str(tiny_model_dir), device="cpu"), SegmenterConfig(image_size=TINY_SIZE)
        ),
        local_files_document_root=str(images_root),
    )
    return create_app(settings).test_client()


@pytest.mark.parametrize(
    "config",
    [
        '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {n} "{("&" + p + ";") * 10}">' for p, n in zip("abcdefg", "bcdefgh"))
        + ']><View><Image name="image" value="$image"/><BrushLabels name="t" toName="image">'
        '<Label value="&h;"/></BrushLabels></View>',
        '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        '<View><Image name="image" value="$image"/><BrushLabels name="t" toName="image">'
        '<Label value="&x;"/></BrushLabels></View>',
    ],
    ids=["billion-laughs", "external-entity"],
)
def test_xml_entity_attacks_are_refused(client, config):
    started = time.monotonic()
    response = client.post("/setup", json={"schema": config})
    assert response.status_code == 400 and "labeling config" in response.get_json()["detail"]
    assert time.monotonic() - started < 2
    assert "root:" not in response.get_data(as_text=True)


def test_label_prompts_follow_the_one_label_rule_and_values_stay_as_written():
    target = parse_label_config(
        '<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i">'
        '<Label value="Road  Sign" prompt="road\u00a0 sign"/><Label value="Cafe\u0301"/>'
        "</BrushLabels></View>"
    )
    assert target.labels == ("Road  Sign", "Cafe\u0301")  # what results must name
    assert target.prompts == ("road sign", "Caf\u00e9")  # NFC, one space
    with pytest.raises(LabelConfigError, match="invisible"):
        parse_label_config(
            '<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i">'
            '<Label value="car" prompt="c\u200bar"/></BrushLabels></View>'
        )
    with pytest.raises(LabelConfigError, match="STABLESEG_MAX_LABELS"):
        parse_label_config(_config_with_labels(11), max_labels=10)
    assert len(parse_label_config(_config_with_labels(10), max_labels=10).labels) == 10


def test_the_label_limit_can_only_be_lowered():
    assert BackendSettings.from_env({"STABLESEG_MAX_LABELS": "20"}).max_labels == 20
    assert BackendSettings.from_env({}).max_labels == 254
    with pytest.raises(ValueError, match="STABLESEG_MAX_LABELS"):
        BackendSettings.from_env({"STABLESEG_MAX_LABELS": "255"})
    with pytest.raises(ValueError, match="STABLESEG_MAX_TASKS"):
        BackendSettings.from_env({"STABLESEG_MAX_TASKS": "-1"})


@pytest.mark.parametrize(
    ("value", "expected"), [(7, 7), ("7", 7), ("12.1700000000", 12), (" 3 ", 3)]
)
def test_project_ids_are_positive_integers(value, expected):
    assert parse_project_id(value) == expected


@pytest.mark.parametrize(
    "value", ["../x", "0", "-1", "1e3", "7.", "7/..", "", None, True, 0, -5, 1.5, "٣", [7]]
)
def test_anything_else_is_not_a_project_id(value):
    with pytest.raises(ValueError, match="positive integer"):
        parse_project_id(value)


# ---------------------------------------------------------------------- file modes
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    target = tmp_path / "out" / "mask.png"
    code = (
        "import sys; from labeler.jobs.io import atomic_write_bytes\n"
        "atomic_write_bytes(sys.argv[1], b'data')\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(target)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        umask=umask,
        check=True,
        timeout=60,
    )
    assert target.read_bytes() == b"data"
    assert target.stat().st_mode & 0o777 == mode
    assert [p.name for p in target.parent.iterdir()] == ["mask.png"]  # no temporary left
