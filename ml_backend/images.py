"""Task image URLs -> decoded images, the way Label Studio's own backends reach them.

* ``/data/upload/...``: from the Label Studio server (``LABEL_STUDIO_URL``), authenticated with
  ``LABEL_STUDIO_API_KEY``.
* ``/data/local-files/?d=PATH``: read from ``LOCAL_FILES_DOCUMENT_ROOT/PATH`` when that root is
  set (any path leaving the root is refused, symlinks included), else through the server.
* ``s3://``, ``gs://``, ``azure-blob://``: through the server's ``/tasks/ID/presign/`` resolver.
* ``http(s)://``: downloaded with a byte cap and a time limit (authenticated only when it points
  at the Label Studio server itself).

Every failure is an :class:`ImageError` whose message says what to fix.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import requests
from PIL import Image

from labeler.jobs.io import ImageError, open_image

from .settings import BackendSettings

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
_CHUNK = 1 << 16
_REFRESH_MARGIN_S = 30.0
_USER_AGENT = "stableseg-labeler-ml-backend"


def is_jwt(token: str) -> bool:
    """A JSON Web Token: three dot-separated base64url parts (Label Studio's personal tokens)."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return False
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    return all(set(part) <= alphabet for part in parts)


def jwt_claims(token: str) -> dict[str, Any]:
    """The unverified payload of a JWT ({} when it cannot be read)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


class LabelStudioAuth:
    """The ``Authorization`` header for one Label Studio server and key.

    A legacy token is sent as ``Token KEY``. A personal access token is a JWT refresh token:
    it is exchanged at ``/api/token/refresh/`` for a short-lived access token, sent as
    ``Bearer ACCESS`` and renewed before it expires. A JWT access token is sent as it is.
    """

    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.timeout = timeout
        self._lock = threading.Lock()
        self._access: str | None = None
        self._expires = 0.0

    def header(self) -> dict[str, str]:
        if not is_jwt(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        if jwt_claims(self.api_key).get("token_type") != "refresh":
            return {"Authorization": f"Bearer {self.api_key}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def _access_token(self) -> str:
        with self._lock:
            if self._access is None or time.time() > self._expires - _REFRESH_MARGIN_S:
                url = urljoin(self.base_url.rstrip("/") + "/", "api/token/refresh/")
                try:
                    response = requests.post(
                        url, json={"refresh": self.api_key}, timeout=self.timeout
                    )
                except requests.RequestException as err:
                    raise ImageError(f"cannot reach Label Studio at {url}: {err}") from None
                if response.status_code != 200:
                    raise ImageError(
                        f"Label Studio refused LABEL_STUDIO_API_KEY at {url} (HTTP "
                        f"{response.status_code}): is the personal access token valid and "
                        "personal access tokens enabled for the organisation?"
                    )
                self._access = str(response.json()["access"])
                self._expires = float(jwt_claims(self._access).get("exp", time.time() + 60))
            return self._access


_auth_cache: dict[tuple[str, str], LabelStudioAuth] = {}
_auth_lock = threading.Lock()


def label_studio_auth(base_url: str, api_key: str) -> LabelStudioAuth:
    """One :class:`LabelStudioAuth` per (server, key) and process, so access tokens are reused."""
    with _auth_lock:
        key = (base_url, api_key)
        if key not in _auth_cache:
            _auth_cache[key] = LabelStudioAuth(base_url, api_key)
        return _auth_cache[key]


def safe_local_path(root: str | Path, relative: str) -> Path:
    """``root / relative`` as a real file inside ``root``.

    Raises:
        ImageError: an empty, absolute or ``..`` path, one that leaves the root through a
            symlink, or one that is not an existing file.
    """
    if not relative:
        raise ImageError("local-files URL has an empty ?d= path")
    posix = PurePosixPath(relative.replace("\\", "/"))
    drive = bool(posix.parts) and len(posix.parts[0]) == 2 and posix.parts[0][1] == ":"
    if posix.is_absolute() or ".." in posix.parts or drive or not posix.parts:
        raise ImageError(
            f"refused local-files path {relative!r}: it must be relative to "
            "LOCAL_FILES_DOCUMENT_ROOT, without '..'"
        )
    real_root = Path(root).resolve()
    try:
        real = (real_root / posix).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ImageError(f"no such file under LOCAL_FILES_DOCUMENT_ROOT: {relative!r}") from None
    if not real.is_relative_to(real_root):
        raise ImageError(
            f"refused local-files path {relative!r}: it leads outside LOCAL_FILES_DOCUMENT_ROOT"
        )
    if not real.is_file():
        raise ImageError(f"local-files path {relative!r} is not a file")
    return real


def download(url: str, headers: dict[str, str], max_bytes: int, timeout: float) -> bytes:
    """GET ``url`` with at most ``max_bytes`` of body and ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    shown = _without_query(url)
    try:
        with _stream(url, headers, timeout) as response:
            if response.status_code != 200:
                hint = ""
                if response.status_code in (401, 403):
                    hint = " (check LABEL_STUDIO_API_KEY)"
                raise ImageError(f"HTTP {response.status_code} for {shown}{hint}")
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise ImageError(
                    f"{shown} is {int(length)} bytes, more than the limit of {max_bytes} "
                    "(STABLESEG_MAX_IMAGE_BYTES)"
                )
            body = bytearray()
            for chunk in response.iter_content(_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise ImageError(
                        f"{shown} is more than the limit of {max_bytes} bytes "
                        "(STABLESEG_MAX_IMAGE_BYTES)"
                    )
                if time.monotonic() > deadline:
                    raise ImageError(
                        f"{shown} took longer than {timeout:g} s (STABLESEG_HTTP_TIMEOUT)"
                    )
            return bytes(body)
    except requests.RequestException as err:
        raise ImageError(f"cannot download {shown}: {err.__class__.__name__}: {err}") from None


@contextmanager
def _stream(url: str, headers: dict[str, str], timeout: float) -> Iterator[requests.Response]:
    response = requests.get(
        url,
        headers={"User-Agent": _USER_AGENT, **headers},
        stream=True,
        timeout=(min(timeout, 10.0), timeout),
    )
    try:
        yield response
    finally:
        response.close()


def _without_query(url: str) -> str:
    """The URL without its query string (pre-signed URLs carry credentials there)."""
    parts = urlsplit(url)
    if "local-files" in parts.path:
        return url
    return parts._replace(query="", fragment="").geturl()


class ImageLoader:
    """Loads task images for one request.

    ``hostname`` and ``access_token`` are what Label Studio sent to ``/setup``; the
    ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` settings win over them.
    """

    def __init__(
        self,
        settings: BackendSettings,
        hostname: str | None = None,
        access_token: str | None = None,
    ) -> None:
        self.settings = settings
        self.base_url = (settings.label_studio_url or hostname or "").rstrip("/") or None
        self.api_key = settings.api_key or access_token or None

    def load(self, url: Any, task_id: int | None = None) -> Image.Image:
        """The decoded, EXIF-transposed image behind a task's URL."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task has no image URL (got {url!r})")
        url = url.strip()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._from_server(self._presign_path(url, task_id), url)
        if scheme in ("http", "https"):
            if self._is_server(parts.netloc) and parts.path.startswith("/data/"):
                return self._from_data_path(parts.path, parts.query, url)
            data = download(url, {}, self.settings.max_image_bytes, self.settings.http_timeout)
            return open_image(data, self.settings.max_pixels)
        if scheme:
            raise ImageError(
                f"unsupported image URL scheme {scheme!r} in {url!r}; use http(s), "
                "/data/upload, /data/local-files or cloud storage"
            )
        path = parts.path if parts.path.startswith("/") else "/" + parts.path
        if path.startswith("/upload/"):
            path = "/data" + path
        if path.startswith("/data/"):
            return self._from_data_path(path, parts.query, url)
        raise ImageError(f"cannot resolve image URL {url!r}: not a Label Studio data path")

    # ------------------------------------------------------------------ sources
    def _from_data_path(self, path: str, query: str, original: str) -> Image.Image:
        root = self.settings.local_files_root
        if path.rstrip("/") == "/data/local-files" and root:
            relative = parse_qs(query).get("d", [""])[0]
            return open_image(safe_local_path(root, relative), self.settings.max_pixels)
        return self._from_server(path + (f"?{query}" if query else ""), original)

    def _from_server(self, path_and_query: str, original: str) -> Image.Image:
        if not self.base_url:
            raise ImageError(
                f"{original!r} is served by Label Studio; set LABEL_STUDIO_URL (and "
                "LABEL_STUDIO_API_KEY) so the backend can fetch it"
                + (
                    ", or LOCAL_FILES_DOCUMENT_ROOT to read local files from disk"
                    if "local-files" in original
                    else ""
                )
            )
        if not self.api_key:
            raise ImageError(
                f"{original!r} is served by Label Studio, which needs LABEL_STUDIO_API_KEY"
            )
        headers = label_studio_auth(self.base_url, self.api_key).header()
        url = self.base_url + path_and_query
        data = download(url, headers, self.settings.max_image_bytes, self.settings.http_timeout)
        return open_image(data, self.settings.max_pixels)

    def _presign_path(self, uri: str, task_id: int | None) -> str:
        if task_id is None:
            raise ImageError(f"cloud storage URI {uri!r} needs the task id to be resolved")
        encoded = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"/tasks/{int(task_id)}/presign/?fileuri={encoded}"

    def _is_server(self, netloc: str) -> bool:
        return bool(self.base_url) and urlsplit(self.base_url).netloc.lower() == netloc.lower()
