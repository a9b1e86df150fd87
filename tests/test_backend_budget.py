"""Bounded cost for every request (issue 18, the backend's side): the download budget, ``/health``
on threads of its own, one log line per record, label configs parsed without DTDs or depth.

The slow cases run against one real ``python cli.py serve`` process (gunicorn, one worker of
four threads, the tiny random Stable Diffusion) with a loopback image server that trickles one
byte a second. Every loop is bounded in count and time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from labeler.commands.settings_table import with_table
from ml_backend.fetch import BudgetSpent, DownloadBudget

from .test_backend_limits import Served, _serve

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 6  # STABLESEG_DOWNLOAD_BUDGET of the test server
TRICKLE_S = 40  # the image server stops trickling after this, whatever happens
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="cat"/><Label value="dog"/></BrushLabels></View>'
)
FORGED = "\n[2026-01-01 00:00:00,000] [ERROR] [ml_backend.model] "


# ---------------------------------------------------------------------- a trickling image server
class Trickler:
    """A loopback server that answers every connection with a PNG's head, then one byte a
    second, for at most TRICKLE_S seconds or until stopped."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        started = time.monotonic()
        while not self.stop.is_set() and time.monotonic() - started < TRICKLE_S:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        started = time.monotonic()
        with conn:
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n")
                conn.sendall(b"Content-Length: 100000\r\n\r\n\x89PNG")
                while not self.stop.is_set() and time.monotonic() - started < TRICKLE_S:
                    conn.sendall(b"\0")
                    self.stop.wait(1.0)
            except OSError:  # the backend hung up: its budget ran out
                return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def trickler() -> Iterator[Trickler]:
    server = Trickler()
    yield server
    server.close()


@pytest.fixture(scope="module")
def images_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("files")  # empty: every local file is missing


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, images_root) -> Iterator[Served]:
    """gunicorn, one worker with the default four threads; 127.0.0.1 opened for images."""
    workspace = tmp_path_factory.mktemp("serve-budget")
    env = {
        "STABLESEG_ALLOWED_HOSTS": "127.0.0.1",
        "STABLESEG_DOWNLOAD_BUDGET": str(BUDGET_S),
        "STABLESEG_MAX_BODY_BYTES": "8000000",
    }
    options = ("--workers", "1", "--threads", "4")
    yield from _serve(
        workspace, tiny_model_dir, images_root, "http://127.0.0.1:9", *options, env=env
    )


def _post(server: Served, path: str, timeout: float = 60, **kwargs) -> requests.Response:
    return requests.post(
        f"{server.url}{path}", headers={"Connection": "close"}, timeout=timeout, **kwargs
    )


# ---------------------------------------------------------------------- through serve
@pytest.mark.slow
def test_health_answers_while_every_thread_waits_on_trickling_downloads(server, trickler):
    """Four requests of four trickling images each hold all four threads; /health answers
    within 2 s meanwhile, and each request ends at its download budget with an error per task
    that names it (not after 4 x STABLESEG_HTTP_TIMEOUT). Eight of the sixteen downloads run at
    once (STABLESEG_MAX_DOWNLOADS), the others wait for a slot within their budget."""
    tasks = [
        {"id": i, "data": {"image": f"http://127.0.0.1:{trickler.port}/slow-{i}.png"}}
        for i in range(4)
    ]
    replies: list[tuple[float, requests.Response]] = []
    started = time.monotonic()

    def predict() -> None:
        response = _post(server, "/predict", json={"tasks": tasks, "label_config": CONFIG})
        replies.append((time.monotonic() - started, response))

    slow = [threading.Thread(target=predict, daemon=True) for _ in range(4)]
    for thread in slow:
        thread.start()
    waited = 0.0
    while trickler.connections < 8 and waited < 10:  # the downloads are under way
        time.sleep(0.1)
        waited += 0.1
    assert trickler.connections >= 8, trickler.connections
    for _ in range(3):
        asked = time.monotonic()
        assert requests.get(f"{server.url}/health", timeout=2).json()["status"] == "UP"
        assert time.monotonic() - asked < 2
        time.sleep(0.2)
    assert not replies, "a slow request ended before /health was asked"
    for thread in slow:
        thread.join(timeout=BUDGET_S + 30)
    assert len(replies) == 4
    reasons = [e["reason"] for _, response in replies for e in response.json()["errors"]]
    assert any("STABLESEG_MAX_DOWNLOADS" in reason for reason in reasons), reasons  # 16 > 8 slots
    for elapsed, response in replies:
        assert response.status_code == 200, response.text[:300]
        errors = response.json()["errors"]
        assert sorted(e["task"] for e in errors) == [0, 1, 2, 3], errors
        assert all("STABLESEG_DOWNLOAD_BUDGET" in e["reason"] for e in errors), errors
        assert elapsed < BUDGET_S + 10, f"answered after {elapsed:.0f} s"


@pytest.mark.slow
def test_caller_data_cannot_forge_log_lines(server):
    """CR/LF in a task id, in a BrushLabels name that a config error names, and %0A in the path
    of a refused request: each is logged, escaped, on its record's own line."""
    task = {"id": "7" + FORGED + "FORGED-TASK", "data": {"image": "/data/local-files/?d=no.png"}}
    reply = _post(server, "/predict", json={"tasks": [task], "label_config": CONFIG})
    assert reply.status_code == 200 and reply.json()["errors"]
    config = CONFIG.replace('name="tag"', 'name="tag&#10;&#13;FORGED-FROM"').replace(
        '<Label value="cat"/><Label value="dog"/>', ""
    )
    reply = _post(server, "/predict", json={"tasks": [task], "label_config": config})
    assert reply.status_code == 400 and "FORGED-FROM" in reply.json()["detail"]
    path = "/predict" + quote(FORGED + "FORGED-PATH", safe="")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900000000\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1"))
        assert b" 413 " in sock.recv(4096).split(b"\r\n", 1)[0]
    time.sleep(0.5)  # the access log is written after the answer
    log = server.log.read_bytes().decode("utf-8", "replace")
    assert "\x1b" not in log and "\r" not in log
    for marker in ("FORGED-TASK", "FORGED-FROM", "FORGED-PATH"):
        lines = [line for line in log.splitlines() if marker in line]
        assert lines, f"{marker} was not logged:\n{log[-3000:]}"
        for line in lines:
            assert not line.lstrip().startswith(("[2026-01-01", "FORGED")), line
        assert any(line.startswith("[") for line in lines), lines


@pytest.mark.slow
def test_label_config_bombs_are_refused_with_a_clear_error(server):
    deep = CONFIG.replace("</View>", "<View>" * 500_000 + "</View>" * 500_000 + "</View>")
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {n} "{("&" + p + ";") * 10}">' for p, n in zip("abcdefg", "bcdefgh"))
        + "]>"
        + CONFIG.replace('value="cat"', 'value="&h;"')
    )
    for config, expected in ((deep, "more than 100 deep"), (laughs, "DTD")):
        assert len(config) < 8_000_000
        reply = _post(server, "/setup", json={"schema": config})
        assert reply.status_code == 400, reply.text[:300]
        assert expected in reply.json()["detail"]
    assert _post(server, "/setup", json={"schema": CONFIG}).status_code == 200


# ---------------------------------------------------------------------- in-process
def test_the_download_budget_counts_only_while_downloads_run():
    budget = DownloadBudget(0.6)
    with budget.download():
        time.sleep(0.3)
    time.sleep(0.5)  # no download: the model's time, not the budget's
    with budget.download() as slot:
        assert 0.1 < slot.deadline - time.monotonic() <= 0.3
        time.sleep(0.35)
    with pytest.raises(BudgetSpent), budget.download():
        pass


def test_a_download_waits_for_a_slot_within_its_budget():
    holder, waiter = DownloadBudget(None, slots=1), DownloadBudget(0.3, slots=1)
    with holder.download():
        started = time.monotonic()
        with pytest.raises(BudgetSpent) as spent, waiter.download():
            pass
        assert spent.value.waiting
        assert time.monotonic() - started >= 0.25
    with DownloadBudget(0.3, slots=1).download():  # the slot is free again
        pass


def test_the_security_limits_table_is_generated_from_the_declarations():
    page = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    assert with_table(page) == page, (
        "docs/security.md's limits table is stale: run "
        "`python -m labeler.commands.settings_table --write docs/security.md`"
    )
    assert "STABLESEG_DOWNLOAD_BUDGET" in page and "STABLESEG_MAX_DOWNLOADS" in page
