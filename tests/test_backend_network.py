"""The backend's outbound requests, against loopback "attacker" servers that count their hits.

Every image URL the backend downloads is chosen by whoever can reach it: these tests check that
refused addresses (in every spelling, and behind redirects) get no request at all, that the
Label Studio key reaches ``LABEL_STUDIO_URL``'s origin and nothing else, that a trickling
server is cut off at the deadline, and that a host name is connected to at the address that
was checked. The servers are real (``ThreadingHTTPServer`` on 127.0.0.x, in a thread); every
loop in them is bounded in count and time.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from labeler.images import ImageError
from labeler.jobs.io import image_bytes
from ml_backend import fetch as fetch_module
from ml_backend.backend_settings import BackendSettings
from ml_backend.fetch import GENERIC_ERROR, FetchError, FetchPolicy, fetch, refusal_reason
from ml_backend.images import ImageLoader
from ml_backend.server import create_app
from ml_backend.training import fetch_project_tasks

from .support import jwt

CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/>'
    "</BrushLabels></View>"
)
PNG = image_bytes(
    Image.fromarray((np.random.default_rng(0).random((12, 16, 3)) * 255).astype("u1"))
)
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
TRICKLE_GAP_S = 0.5
TRICKLE_MAX_BYTES = 40  # 20 s at most: far past every deadline below, yet bounded
SERVER_LOOP_S = 20.0  # no handler loop runs longer than this
REFRESH_TOKEN = jwt({"token_type": "refresh", "exp": 4102444800})
ACCESS_TOKEN = jwt({"token_type": "access", "exp": 4102444800})


# ---------------------------------------------------------------------- servers
class Server:
    """A loopback HTTP server that records every request (method, path, headers).

    Routes: ``.../redirect?to=URL[&status=N]``, ``/loop`` (redirects to itself),
    ``/trickle-body`` and ``/trickle-headers`` (one byte every 0.5 s), ``/api/tasks``
    (a page of tasks), ``/tasks/N/presign/`` (redirects to ``presign_to`` when set),
    ``POST /api/token/refresh/``; anything else answers a small PNG. With ``require_auth``
    set, ``/data/...`` answers 401 to any other Authorization header.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.sni: list[str | None] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.presign_to: str | None = None
        self.require_auth: str | None = None
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            context.sni_callback = lambda _sock, name, _context: self.sni.append(name)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def hits(self) -> int:
        with self.lock:
            return len(self.requests)

    def headers(self, name: str) -> list[str | None]:
        with self.lock:
            return [headers.get(name.lower()) for _, _, headers in self.requests]

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _record(self) -> None:
            headers = {key.lower(): value for key, value in self.headers.items()}
            with server.lock:
                server.requests.append((self.command, self.path, headers))

        def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(extra or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _trickle(self, data: bytes) -> None:
            started = time.monotonic()
            for byte in data[:TRICKLE_MAX_BYTES]:
                if server.stop.is_set() or time.monotonic() - started > SERVER_LOOP_S:
                    return
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:  # the client went away: what the deadline should make happen
                    return
                time.sleep(TRICKLE_GAP_S)

        def do_POST(self) -> None:
            self._record()
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/api/token/refresh/" and body.get("refresh") == REFRESH_TOKEN:
                return self._send(200, json.dumps({"access": ACCESS_TOKEN}).encode())
            return self._send(401, b"{}")

        def do_GET(self) -> None:
            self._record()
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            auth = self.headers.get("Authorization")
            protected = server.require_auth and parts.path.startswith("/data/")
            if protected and auth != server.require_auth:
                return self._send(401, b"unauthorised")
            if parts.path.endswith("/redirect"):
                status = int(query.get("status", ["302"])[0])
                return self._send(status, b"", {"Location": query["to"][0]})
            if parts.path == "/loop":
                return self._send(302, b"", {"Location": "/loop"})
            if parts.path.startswith("/tasks/") and server.presign_to:
                return self._send(302, b"", {"Location": server.presign_to})
            if parts.path == "/trickle-body":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.flush()
                return self._trickle(PNG)
            if parts.path == "/trickle-headers":
                self.wfile.flush()
                return self._trickle(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n" * 2)
            if parts.path == "/api/tasks":
                tasks = [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]
                return self._send(200, json.dumps({"tasks": tasks, "total": 1}).encode())
            return self._send(200, PNG)

    return Handler


@pytest.fixture
def attacker() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


@pytest.fixture
def allowed() -> Iterator[Server]:
    """A second server on loopback: plays Label Studio, or a host opened by the allow-list."""
    server = Server()
    yield server
    server.close()


def _settings(**env: str) -> BackendSettings:
    """Settings as the backend reads them from its environment (a model that never loads)."""
    return BackendSettings.from_env({"STABLESEG_MODEL": "unused", "STABLESEG_DEVICE": "cpu", **env})


def _fetch(url: str, settings: BackendSettings, timeout: float | None = None) -> bytes:
    return fetch(
        url,
        FetchPolicy.from_settings(settings),
        max_bytes=settings.max_image_bytes,
        timeout=timeout or settings.http_timeout,
    )


def _refused(url: str, settings: BackendSettings) -> FetchError:
    with pytest.raises(FetchError) as info:
        _fetch(url, settings)
    assert str(info.value) == GENERIC_ERROR
    return info.value


# ---------------------------------------------------------------------- address policy
@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.31.0.1", "private"),
        ("192.168.0.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.2.1", "documentation"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "unique-local"),
        ("fd12:3456::1", "unique-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
        ("2002:7f00:1::", "loopback IPv4 127.0.0.1 inside IPv6"),  # 6to4
        ("2002:a00:1::", "private IPv4 10.0.0.1 inside IPv6"),
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata) IPv4 169.254.169.254 inside IPv6"),
    ],
)
def test_non_public_addresses_are_refused_with_their_kind(address, reason):
    assert (refusal_reason(ip_address(address)) or "").startswith(reason)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]
)
def test_public_addresses_pass(address):
    assert refusal_reason(ip_address(address)) is None


REFUSED_URLS = [
    "http://127.0.0.1:{port}/pic.png",
    "http://localhost:{port}/pic.png",
    "http://2130706433:{port}/pic.png",  # decimal
    "http://0x7f000001:{port}/pic.png",  # hex
    "http://0177.0.0.1:{port}/pic.png",  # octal
    "http://017700000001:{port}/pic.png",  # octal, one number
    "http://127.1:{port}/pic.png",  # short
    "http://0:{port}/pic.png",  # 0.0.0.0 reaches local listeners on Linux
    "http://0.0.0.0:{port}/pic.png",
    "http://[::1]:{port}/pic.png",
    "http://[::ffff:127.0.0.1]:{port}/pic.png",  # IPv4-mapped: reaches the IPv4 listener
    "http://[::ffff:7f00:1]:{port}/pic.png",
    "http://[2002:7f00:1::]:{port}/pic.png",
    "http://[64:ff9b::7f00:1]:{port}/pic.png",
    "HTTP://LOCALHOST:{port}/pic.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/pic.png",
    "http://192.168.1.1/pic.png",
    "http://172.16.0.1/pic.png",
    "http://100.64.0.1/pic.png",
    "http://[fe80::1]/pic.png",
    "http://[fc00::1]/pic.png",
    "http://user:pw@127.0.0.1:{port}/pic.png",
    "http://user:pw@example.com/pic.png",  # userinfo is refused before any lookup
    "http://127.0.0.1:{port}@example.com/pic.png",
    "http://example.com\\@127.0.0.1:{port}/pic.png",
    "ftp://127.0.0.1:{port}/pic.png",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{port}/_GET",
]


@pytest.mark.parametrize("template", REFUSED_URLS)
def test_refused_urls_never_reach_the_attacker(attacker, template, caplog):
    url = template.format(port=attacker.port)
    settings = _settings()
    with caplog.at_level(logging.WARNING, logger="ml_backend"):
        error = _refused(url, settings)
    assert error.detail.startswith("refused"), error.detail  # refused before any connection
    assert "refused" in caplog.text and "user:pw" not in caplog.text
    if url.lower().startswith("http"):  # the loader gives the same single message
        with pytest.raises(ImageError) as info:
            ImageLoader(settings).load(url, task_id=3)
        assert str(info.value) == GENERIC_ERROR
    assert attacker.hits == 0


def test_predict_answers_the_generic_error_with_the_task_id(attacker, caplog):
    client = create_app(_settings()).test_client()
    urls = {
        7: f"http://2130706433:{attacker.port}/pic.png",
        8: "http://169.254.169.254/latest/meta-data/iam/",
        9: f"http://[::ffff:127.0.0.1]:{attacker.port}/pic.png",
    }
    tasks = [{"id": task_id, "data": {"image": url}} for task_id, url in urls.items()]
    with caplog.at_level(logging.WARNING, logger="ml_backend"):
        response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert response.status_code == 200
    body = response.get_json()
    assert body["errors"] == [{"task": t, "reason": GENERIC_ERROR} for t in urls]
    assert body["results"] == [[], [], []]
    assert "loopback" not in response.get_data(as_text=True)
    assert "loopback" in caplog.text and "link-local" in caplog.text  # the detail is logged
    assert attacker.hits == 0


# ---------------------------------------------------------------------- redirects
@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/pic.png",  # same host, another port than LABEL_STUDIO_URL's
        "http://2130706433:{port}/pic.png",
        "http://[::ffff:127.0.0.1]:{port}/pic.png",
        "http://user:pw@127.0.0.1:{port}/pic.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/pic.png",
        "file:///etc/passwd",
    ],
)
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_to_refused_addresses_are_refused(allowed, attacker, target, status):
    settings = _settings(LABEL_STUDIO_URL=allowed.url)
    location = quote(target.format(port=attacker.port), safe="")
    error = _refused(f"{allowed.url}/redirect?to={location}&status={status}", settings)
    assert error.detail.startswith("refused"), error.detail
    assert allowed.hits == 1 and attacker.hits == 0


def test_redirects_within_the_rules_are_followed_and_bounded(allowed, attacker):
    settings = _settings(LABEL_STUDIO_URL=allowed.url)
    assert _fetch(f"{allowed.url}/redirect?to=/pic.png", settings) == PNG
    assert allowed.hits == 2
    error = _refused(f"{allowed.url}/loop", settings)
    assert "more than 5 redirects" in error.detail
    assert allowed.hits == 2 + 6 and attacker.hits == 0


# ---------------------------------------------------------------------- allow-list
@pytest.mark.parametrize(
    ("allow", "host"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.0/8", "127.0.0.1"),
        ("10.0.0.0/8, 127.0.0.1/32", "127.0.0.1"),
        ("127.0.0.0/8", "2130706433"),  # an allowed address is allowed in any spelling
        ("localhost", "localhost"),
        ("LocalHost.", "localhost"),
    ],
)
def test_the_allow_list_opens_hosts_and_networks(attacker, allow, host):
    settings = _settings(STABLESEG_ALLOWED_HOSTS=allow)
    assert _fetch(f"http://{host}:{attacker.port}/pic.png", settings) == PNG
    assert attacker.hits == 1
    assert attacker.headers("Host") == [f"{host}:{attacker.port}"]


@pytest.mark.parametrize(
    ("allow", "host"),
    [
        ("localhost", "127.0.0.1"),  # a name opens that name, not its address
        ("10.0.0.0/8", "127.0.0.1"),
        ("images.local", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.1"),
    ],
)
def test_the_allow_list_opens_nothing_else(attacker, allow, host):
    settings = _settings(STABLESEG_ALLOWED_HOSTS=allow)
    _refused(f"http://{host}:{attacker.port}/pic.png", settings)
    assert attacker.hits == 0


def test_label_studio_url_opens_its_own_origin_only(allowed, attacker):
    settings = _settings(LABEL_STUDIO_URL=allowed.url + "/")
    assert _fetch(f"{allowed.url}/pic.png", settings) == PNG
    _refused(f"http://127.0.0.1:{attacker.port}/pic.png", settings)
    _refused(f"https://127.0.0.1:{allowed.port}/pic.png", settings)  # another scheme
    assert allowed.hits == 1 and attacker.hits == 0


def test_allowed_hosts_are_validated():
    env = {"STABLESEG_ALLOWED_HOSTS": " 10.0.0.0/8, Images.Local ,,192.168.1.7 "}
    assert _settings(**env).allowed_hosts == ("10.0.0.0/8", "images.local", "192.168.1.7/32")
    assert BackendSettings(allowed_hosts="10.1.2.3/8").allowed_hosts == ("10.0.0.0/8",)
    for bad in ("http://images.local", "images.local:8080", "10.0.0.0/33", "bad host", "a/b"):
        with pytest.raises(ValueError, match=r"STABLESEG_ALLOWED_HOSTS entry .*10\.0\.0\.0/8"):
            _settings(STABLESEG_ALLOWED_HOSTS=bad)


# ---------------------------------------------------------------------- credentials
def test_setup_hostname_and_token_are_never_used(attacker, caplog):
    """The issue's finding: LABEL_STUDIO_API_KEY set, LABEL_STUDIO_URL unset, and an
    unauthenticated /setup naming the attacker as Label Studio."""
    client = create_app(_settings(LABEL_STUDIO_API_KEY=REFRESH_TOKEN)).test_client()
    setup = {"project": "7.1", "schema": CONFIG, "hostname": attacker.url}
    response = client.post("/setup", json={**setup, "access_token": LEGACY_TOKEN})
    assert response.status_code == 200
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/1/a.png"}},
        {"id": 2, "data": {"image": "/data/local-files/?d=imgs/a.png"}},
        {"id": 3, "data": {"image": "s3://bucket/a.png"}},
        {"id": 4, "data": {"image": f"{attacker.url}/data/upload/1/a.png"}},
    ]
    body = client.post(
        "/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "7.1"}
    ).get_json()
    reasons = {error["task"]: error["reason"] for error in body["errors"]}
    for task_id in (1, 2, 3):
        assert "set LABEL_STUDIO_URL" in reasons[task_id]
    assert reasons[4] == GENERIC_ERROR
    webhook = {"action": "START_TRAINING", "project": {"id": 7, "label_config": CONFIG}}
    status = client.post("/webhook", json=webhook).get_json()
    assert status["status"] == "error" and "LABEL_STUDIO_URL" in status["detail"]
    assert attacker.hits == 0  # no file, no presign, no token refresh, no task listing


def test_the_key_goes_to_label_studio_url_and_nowhere_else(allowed, attacker):
    """Label Studio (``allowed``) is reached with the key; the attacker is reachable (allowed
    by STABLESEG_ALLOWED_HOSTS) by a direct URL, a Label Studio redirect, a cloud-storage
    pre-signed redirect, and gets no credential on any of them."""
    settings = _settings(
        LABEL_STUDIO_URL=allowed.url,
        LABEL_STUDIO_API_KEY=REFRESH_TOKEN,
        STABLESEG_ALLOWED_HOSTS="127.0.0.1",
    )
    allowed.presign_to = f"{attacker.url}/bucket/a.png?X-Amz-Signature=abc"
    loader = ImageLoader(settings)
    to_attacker = quote(f"{attacker.url}/data/upload/1/a.png", safe="")
    for url, task_id in [
        ("/data/upload/1/a.png", None),
        (f"{allowed.url}/data/upload/1/a.png", None),
        (f"/data/upload/redirect?to={to_attacker}", None),
        ("s3://bucket/a.png", 5),
        (f"{attacker.url}/data/upload/1/a.png", None),
    ]:
        assert loader.load(url, task_id).size == (16, 12)
    assert fetch_project_tasks(loader, "3") == [
        {"id": 1, "data": {"image": "/data/upload/1/a.png"}}
    ]
    with allowed.lock:
        label_studio = [(m, p, h.get("authorization")) for m, p, h in allowed.requests]
    assert label_studio[0] == ("POST", "/api/token/refresh/", None)  # the refresh token is in
    assert all(auth == f"Bearer {ACCESS_TOKEN}" for _, _, auth in label_studio[1:])  # its body
    assert len(label_studio) == 1 + 5
    assert attacker.hits == 3
    with attacker.lock:
        seen = json.dumps(attacker.requests)
    for secret in (REFRESH_TOKEN, ACCESS_TOKEN, "authorization", "cookie", "Bearer", "Token "):
        assert secret not in seen


def test_label_studio_refusing_the_key_is_named_but_third_parties_are_not(allowed, attacker):
    """A 401 from LABEL_STUDIO_URL is about our own settings and says so; a 401 from anyone
    else, even a redirect target of Label Studio, is the generic error."""
    settings = _settings(
        LABEL_STUDIO_URL=allowed.url,
        LABEL_STUDIO_API_KEY="wrong",
        STABLESEG_ALLOWED_HOSTS="127.0.0.1",
    )
    allowed.require_auth = attacker.require_auth = f"Token {LEGACY_TOKEN}"
    loader = ImageLoader(settings)
    with pytest.raises(ImageError, match=r"refused LABEL_STUDIO_API_KEY \(HTTP 401\)"):
        loader.load("/data/upload/1/a.png")
    refused = quote(f"{attacker.url}/data/upload/1/a.png", safe="")
    for url in (f"{attacker.url}/data/upload/1/a.png", f"/data/upload/redirect?to={refused}"):
        allowed.require_auth = None  # Label Studio redirects without checking
        with pytest.raises(ImageError) as info:
            loader.load(url)
        assert str(info.value) == GENERIC_ERROR
    refresh = jwt({"token_type": "refresh", "user": 2})  # a refresh Label Studio refuses
    settings = _settings(LABEL_STUDIO_URL=allowed.url, LABEL_STUDIO_API_KEY=refresh)
    with pytest.raises(ImageError, match="refused LABEL_STUDIO_API_KEY"):
        ImageLoader(settings).load("/data/upload/1/a.png")
    assert attacker.hits == 2 and all(auth is None for auth in attacker.headers("Authorization"))


# ---------------------------------------------------------------------- deadlines
@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_trickling_server_is_cut_off_at_the_deadline(attacker, path, caplog):
    settings = _settings(STABLESEG_HTTP_TIMEOUT="2", STABLESEG_ALLOWED_HOSTS="127.0.0.1")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ml_backend"), pytest.raises(ImageError) as info:
        ImageLoader(settings).load(f"{attacker.url}{path}")
    elapsed = time.monotonic() - started
    assert str(info.value) == GENERIC_ERROR
    assert "took longer than STABLESEG_HTTP_TIMEOUT" in caplog.text
    # 1.9 s at least: it waited for the trickle; far less than the 20 s the trickle lasts.
    assert 1.9 <= elapsed < 3.0, elapsed


def test_a_tls_handshake_that_trickles_is_cut_off_at_the_deadline():
    """A TLS server that sends a record header, then one byte every 0.5 s: a blocking
    handshake would wait a full timeout per byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SERVER_LOOP_S)
    stop = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            for index, byte in enumerate(b"\x16\x03\x03\x40\x00" + b"\x02" * TRICKLE_MAX_BYTES):
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                if index >= 5:
                    time.sleep(TRICKLE_GAP_S)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings = _settings(STABLESEG_HTTP_TIMEOUT="2", STABLESEG_ALLOWED_HOSTS="127.0.0.1")
    started = time.monotonic()
    try:
        error = _refused(f"https://127.0.0.1:{listener.getsockname()[1]}/pic.png", settings)
    finally:
        stop.set()
        listener.close()
    assert 1.9 <= time.monotonic() - started < 3.0
    assert "took longer than STABLESEG_HTTP_TIMEOUT" in error.detail


# ---------------------------------------------------------------------- DNS rebinding
@pytest.fixture
def twin_servers() -> Iterator[tuple[Server, Server]]:
    """A server on 127.0.0.2 and an attacker on 127.0.0.1, on the same port."""
    for _ in range(20):
        good = Server("127.0.0.2")
        try:
            evil = Server("127.0.0.1", good.port)
        except OSError:  # that port is taken on 127.0.0.1: try another
            good.close()
            continue
        yield good, evil
        good.close()
        evil.close()
        return
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2 in 20 tries")


def _rebinding_resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]):
    """socket.getaddrinfo that answers the listed names from ``answers`` (one list of
    addresses per call, the last one repeated), and counts the calls."""
    real = socket.getaddrinfo
    calls: dict[str, int] = {}

    def resolve(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        calls[host] = calls.get(host, 0) + 1
        addresses = answers[host][min(calls[host], len(answers[host])) - 1]
        return [info for a in addresses for info in real(a, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return calls


def test_a_name_is_connected_to_at_the_address_that_was_checked(twin_servers, monkeypatch):
    good, evil = twin_servers
    calls = _rebinding_resolver(monkeypatch, {"rebind.test": [["127.0.0.2"], ["127.0.0.1"]]})
    settings = _settings(STABLESEG_ALLOWED_HOSTS="127.0.0.2")
    url = f"http://rebind.test:{good.port}/pic.png"
    assert _fetch(url, settings) == PNG
    assert calls == {"rebind.test": 1}
    assert good.headers("Host") == [f"rebind.test:{good.port}"] and evil.hits == 0
    # The control: a client that resolves again when it connects is rebound to the attacker.
    session = requests.Session()
    session.trust_env = False
    assert session.get(url, timeout=5).content == PNG
    assert evil.hits == 1 and good.hits == 1


def test_one_refused_address_refuses_the_name(attacker, monkeypatch):
    calls = _rebinding_resolver(
        monkeypatch,
        {"mixed.test": [["93.184.216.34", "127.0.0.1"]]},
    )
    settings = _settings()
    error = _refused(f"http://mixed.test:{attacker.port}/pic.png", settings)
    assert "127.0.0.1, loopback" in error.detail
    assert attacker.hits == 0 and calls == {"mixed.test": 1}


# ---------------------------------------------------------------------- TLS
@pytest.fixture
def localhost_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for the name ``localhost`` only, trusted through
    REQUESTS_CA_BUNDLE (as a private CA would be)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=DNS:localhost"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    fetch_module._tls_context.cache_clear()
    yield cert, key
    fetch_module._tls_context.cache_clear()


def test_https_is_verified_against_the_name_while_connecting_to_the_checked_address(
    localhost_certificate,
):
    server = Server(tls=localhost_certificate)
    try:
        settings = _settings(STABLESEG_ALLOWED_HOSTS="localhost")
        assert _fetch(f"https://localhost:{server.port}/pic.png", settings) == PNG
        assert server.sni == ["localhost"]
        assert server.headers("Host") == [f"localhost:{server.port}"]
        # The same server by its address: the certificate does not name 127.0.0.1.
        settings = _settings(STABLESEG_ALLOWED_HOSTS="127.0.0.1")
        error = _refused(f"https://127.0.0.1:{server.port}/pic.png", settings)
        assert "CERTIFICATE_VERIFY_FAILED" in error.detail, error.detail
        assert server.hits == 1
    finally:
        server.close()
