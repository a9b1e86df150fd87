"""A real Label Studio server for the integration test: install, start, authenticate, stop.

Label Studio lives in a virtual environment of its own (``$LABEL_STUDIO_VENV``, default
``~/.cache/stableseg/ls-venv``), installed by ``scripts/labelstudio_env.sh`` when missing. The
server listens on 127.0.0.1 only, keeps its data in a temporary folder, and every wait is
bounded.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from .tool_env import LABEL_STUDIO, ToolUnavailable

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180
USER = "admin@example.com"
PASSWORD = "stableseg-test-password"
LEGACY_TOKEN = "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c"

# Run inside Label Studio's Django: enable legacy tokens, print a personal access token.
_DJANGO_SCRIPT = """
import django, json
django.setup()
from django.contrib.auth import get_user_model
from jwt_auth.models import JWTSettings, LSAPIToken
user = get_user_model().objects.get(email={user!r})
settings, _ = JWTSettings.objects.get_or_create(organization=user.active_organization)
settings.legacy_api_tokens_enabled = True
settings.api_tokens_enabled = True
settings.save()
print(json.dumps({{"pat": LSAPIToken.for_user(user).get_full_jwt()}}))
"""


LabelStudioUnavailable = ToolUnavailable


def venv_dir() -> Path:
    return LABEL_STUDIO.venv()


def ensure_installed(venv: Path | None = None) -> Path:
    """The Label Studio environment, installed by ``scripts/labelstudio_env.sh`` if missing."""
    return LABEL_STUDIO.ensure_installed(venv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, timeout: float, process: subprocess.Popen, what: str, **kwargs) -> None:
    """Poll ``url`` until it answers 200; fail early when ``process`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it answered")
        try:
            if requests.get(url, timeout=2, **kwargs).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group started for ``process``, then SIGKILL what is left."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class ApiClient:
    """Calls to Label Studio's API at ``self.url`` with ``self.headers()``: the JSON answer, or
    an AssertionError naming the call and the answer for an HTTP error."""

    url: str

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        response = requests.request(
            method, self.url + path, headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs
        )
        if response.status_code >= 400:
            raise AssertionError(
                f"{method} {path} -> HTTP {response.status_code}: {response.text[:2000]}"
            )
        return response.json() if response.content else None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)


@dataclass
class LabelStudio(ApiClient):
    """A running server and an API client for it with the legacy token."""

    url: str
    legacy_token: str
    personal_token: str
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.legacy_token}"}


@contextmanager
def label_studio(
    data_dir: Path, files_root: Path, venv: Path | None = None
) -> Iterator[LabelStudio]:
    """Start Label Studio on a free loopback port serving ``files_root`` as local files."""
    venv = ensure_installed(venv)
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        # Label Studio signs JWTs with SECRET_KEY. Left unset, each of its starting processes
        # may generate and append its own key to DATA_DIR/.env (a race seen on 2 cores): the
        # server then holds one key and the token-minting shell reads the other, and every
        # personal access token is "invalid". One key for all of them removes the race.
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "label-studio.log"
    command = [
        str(venv / "bin" / "label-studio"),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "-p",
        str(port),
        "--host",
        f"http://127.0.0.1:{port}",
        "--username",
        USER,
        "--password",
        PASSWORD,
        "--user-token",
        LEGACY_TOKEN,
        "--data-dir",
        str(data_dir),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        wait_for(f"{url}/health", START_TIMEOUT_S, process, "Label Studio")
        logger.info("Label Studio answered after %.0f s", time.monotonic() - started)
        pat = _personal_token(venv, env)
        yield LabelStudio(url=url, legacy_token=LEGACY_TOKEN, personal_token=pat, log=log)
    except BaseException:
        sys.stderr.write(f"--- Label Studio log (end) ---\n{tail(log)}\n")
        raise
    finally:
        stop(process)


def _personal_token(venv: Path, env: dict[str, str]) -> str:
    """Enable legacy tokens for the organisation and mint a personal access token."""
    package = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import label_studio, os; print(os.path.dirname(label_studio.__file__))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _DJANGO_SCRIPT.format(user=USER)],
        cwd=package,
        env={**env, "DJANGO_SETTINGS_MODULE": "core.settings.label_studio"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"configuring Label Studio's tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["pat"]


def installed_or_skip() -> Path:
    """The Label Studio environment, or a loud skip where it cannot be installed (a failure
    instead with STABLESEG_REQUIRE_LABEL_STUDIO=1)."""
    return LABEL_STUDIO.installed_or_skip()


def stop_group(pgid: int, timeout: float = 30) -> None:
    """SIGTERM every process of a process group, then SIGKILL what is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


class TokenClient(ApiClient):
    """Label Studio's API with a personal access token, the way scripts use it: the token is
    exchanged at /api/token/refresh/ for an access token (5 minutes), sent as ``Bearer``."""

    def __init__(self, url: str, personal_token: str) -> None:
        self.url = url.rstrip("/")
        self.personal_token = personal_token
        self._access = ""
        self._expires = 0.0

    def headers(self) -> dict[str, str]:
        if time.monotonic() > self._expires:
            response = requests.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self.personal_token}, timeout=30
            )
            response.raise_for_status()
            self._access = response.json()["access"]
            self._expires = time.monotonic() + 120
        return {"Authorization": f"Bearer {self._access}"}

    def tasks(self, project: int, **params: Any) -> list[dict[str, Any]]:
        """Every task of a project, page by page (``params`` go to /api/tasks)."""
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            listing = self.get(
                "/api/tasks",
                params={"project": project, "page": page, "page_size": 100, **params},
            )
            found += listing["tasks"]
            if not listing["tasks"] or len(found) >= listing["total"]:
                return found
            page += 1


def mint_personal_token(venv: Path, data_dir: Path, secret_key: str | None = None) -> str:
    """A personal access token for :data:`USER` of the server keeping its data in ``data_dir``
    (minted inside Label Studio's Django, so it works beside a token the user already has).

    ``secret_key`` is the ``SECRET_KEY`` the server was started with; without one, the key the
    server wrote into ``data_dir`` is read (racy on 2 cores: see :func:`label_studio`)."""
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)}
    env.pop("SECRET_KEY", None)
    if secret_key is not None:
        env["SECRET_KEY"] = secret_key
    return _personal_token(venv, env)
