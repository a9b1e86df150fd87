"""``label-studio predict`` against a fake Label Studio on loopback whose answers are wrong: a
listing that never ends, one that repeats itself, JSON nested 200,000 deep, an answer that is
not JSON. Each run ends with a clear error and exit status 1, no traceback; every loop here is
bounded (the command's page guard, the server's request cap)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from click.testing import CliRunner

from labeler.commands import main

from .support import local_http_server

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = str(ROOT / "demo" / "model")
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="red"/></BrushLabels></View>'
)
DEEP = "[" * 200_000 + "]" * 200_000
MAX_REQUESTS = 200  # the fake server refuses to answer more: a runaway loop still ends


def fake_label_studio(mode: str, where: str = "tasks"):
    """A handler class for one misbehaving Label Studio; ``requests`` counts task listings."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        requests = 0

        def log_message(self, *args) -> None:
            pass

        def _send(self, body: str, status: int = 200) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path.startswith("/api/projects/"):
                if where == "project":
                    self._send(DEEP if mode == "deep" else "<html>not json</html>")
                else:
                    self._send(json.dumps({"id": 1, "label_config": CONFIG}))
                return
            if url.path != "/api/tasks/":
                self._send("{}", 404)
                return
            with lock:
                Handler.requests += 1
                if Handler.requests > MAX_REQUESTS:
                    self._send(json.dumps({"detail": "too many requests"}), 400)
                    return
            query = parse_qs(url.query)
            page, size = int(query["page"][0]), int(query["page_size"][0])
            if mode == "deep":
                self._send(DEEP)
                return
            if mode == "endless":  # new tasks on every page, the total always one page ahead
                first = (page - 1) * size + 1
                total = page * size + 1
            else:  # "repeat": the same page whatever is asked
                first, total = 1, 10**6
            tasks = [{"id": first + i, "data": {}} for i in range(size)]
            self._send(json.dumps({"tasks": tasks, "total": total}))

    return Handler


def predict(url: str, tmp_path: Path, *extra: str):
    env = {"LABEL_STUDIO_API_KEY": "0123456789abcdef", "LABEL_STUDIO_URL": None}
    args = ["label-studio", "predict", "--url", url, "--project", "1", "--model", DEMO_MODEL]
    args += ["--retries", "0", "--timeout", "10", "--page-size", "5"]
    args += ["--failed-log", str(tmp_path / "failed.jsonl"), *extra]
    return CliRunner().invoke(main, args, env=env)


@pytest.mark.parametrize(
    ("mode", "where", "message"),
    [
        ("endless", "tasks", "still lists tasks past page 3, though the project had 2 tasks"),
        ("repeat", "tasks", "listed task 1 after task 5"),
        ("deep", "tasks", "answered with JSON nested too deeply to read"),
        ("deep", "project", "answered with JSON nested too deeply to read"),
        ("garbage", "project", "something that is not JSON"),
    ],
)
def test_a_wrong_label_studio_ends_the_run_with_a_clear_error(tmp_path, mode, where, message):
    handler = fake_label_studio(mode, where)
    with local_http_server(handler) as url:
        result = predict(url, tmp_path)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a traceback
    assert "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output
    assert handler.requests < 10  # bounded: a few pages, never the server's cap
