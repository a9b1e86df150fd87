"""Task image URLs -> decoded images, the way Label Studio's own backends reach them.

* ``/data/upload/...``: from the Label Studio server (``LABEL_STUDIO_URL``), authenticated with
  ``LABEL_STUDIO_API_KEY``.
* ``/data/local-files/?d=PATH``: read from ``LOCAL_FILES_DOCUMENT_ROOT/PATH`` when that root is
  set (any path leaving the root is refused, symlinks included), else through the server. The
  root may be an object storage URL (``s3://bucket/prefix``: :mod:`labeler.jobs.storage`), read
  with the storage client's own credentials.
* ``s3://``, ``gs://``, ``azure-blob://``: through the server's ``/tasks/ID/presign/`` resolver.
* ``http(s)://``: downloaded by :func:`ml_backend.fetch.fetch` (public addresses,
  ``LABEL_STUDIO_URL``'s origin and ``STABLESEG_ALLOWED_HOSTS`` only; a byte cap and a deadline),
  authenticated only when it points at ``LABEL_STUDIO_URL``'s origin.

The key goes to ``LABEL_STUDIO_URL``'s origin and nowhere else: not to a ``hostname`` sent to
``/setup`` or in a request body (those are never used), not along a redirect to another origin.

Every failure is an :class:`ImageError`. Local-file and configuration errors say what to fix;
anything that went over the network says only "image URL refused or unreachable" (whoever
sends the URL must not learn how a third party answered); the log has the detail.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import requests
from PIL import Image

from labeler.images import ImageError, open_image
from labeler.jobs.io import image_input
from labeler.jobs.storage import RemotePath, as_location, is_url

from .backend_settings import BackendSettings
from .fetch import BudgetSpent, DownloadBudget, FetchError, FetchPolicy, fetch, redact
from .limits import download_budget_spent

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
_REFRESH_MARGIN_S = 30.0


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
                # no redirects and no proxy: the refresh token goes to LABEL_STUDIO_URL only,
                # as every other request with the key does (ml_backend.fetch uses no proxy)
                try:
                    with requests.Session() as session:
                        session.trust_env = False  # HTTP(S)_PROXY, ALL_PROXY and .netrc unused
                        response = session.post(
                            url,
                            json={"refresh": self.api_key},
                            timeout=self.timeout,
                            allow_redirects=False,
                        )
                except requests.RequestException as err:
                    logger.warning("token refresh at %s failed: %s", url, err)
                    raise ImageError(
                        "cannot reach Label Studio at LABEL_STUDIO_URL to refresh "
                        "LABEL_STUDIO_API_KEY"
                    ) from None
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


def _relative_part(relative: str) -> PurePosixPath:
    """A local-files ``?d=`` path, checked: relative, without ``..`` or a drive.

    Raises:
        ImageError: an empty, absolute or ``..`` path.
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
    return posix


def storage_path(root: str, relative: str) -> RemotePath:
    """``root / relative`` for a LOCAL_FILES_DOCUMENT_ROOT in object storage (the same checks
    of ``relative`` as :func:`safe_local_path`; an object store has no symlinks).

    Raises:
        ImageError: an empty, absolute or ``..`` path.
    """
    location = as_location(root)
    assert isinstance(location, RemotePath)
    return location / _relative_part(relative)


def safe_local_path(root: str | Path, relative: str) -> Path:
    """``root / relative`` as a real file inside ``root``.

    Raises:
        ImageError: an empty, absolute or ``..`` path, one that leaves the root through a
            symlink, or one that is not an existing file.
    """
    posix = _relative_part(relative)
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


class ImageLoader:
    """Loads task images for one request.

    The Label Studio server and key are ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` only:
    a ``hostname`` or ``access_token`` that arrives in ``/setup`` or a request body comes from
    whoever can reach the backend and is never used for a URL or a credential.

    Every download takes one of the process's ``STABLESEG_MAX_DOWNLOADS`` slots and runs within
    ``budget`` (a ``/predict``'s: :class:`ml_backend.fetch.DownloadBudget`; None: each download
    has only its own ``STABLESEG_HTTP_TIMEOUT``).
    """

    def __init__(self, settings: BackendSettings, budget: DownloadBudget | None = None) -> None:
        self.settings = settings
        self.base_url = (settings.label_studio_url or "").rstrip("/") or None
        self.api_key = settings.label_studio_api_key or None
        self.policy = FetchPolicy.from_settings(settings)
        self.budget = budget or DownloadBudget(None, settings.max_downloads)

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
            if self.policy.is_label_studio(url) and parts.path.startswith("/data/"):
                return self._from_data_path(parts.path, parts.query, url)
            data = self._download(url, self.settings.max_image_bytes)
            return self._decode(data, url)
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

    def label_studio_bytes(self, path_and_query: str, max_bytes: int) -> bytes:
        """GET ``LABEL_STUDIO_URL + path_and_query`` with the key (the only authenticated call).

        Raises:
            ImageError: LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY unset, or refused by Label
                Studio (these name the variable); FetchError (generic) for anything else.
        """
        if not self.base_url or not self.api_key:
            missing = "LABEL_STUDIO_URL" if not self.base_url else "LABEL_STUDIO_API_KEY"
            raise ImageError(f"set {missing} so the backend can fetch from Label Studio")
        headers = label_studio_auth(self.base_url, self.api_key).header()
        try:
            return self._download(self.base_url + path_and_query, max_bytes, headers)
        except FetchError as err:
            if err.status in (401, 403) and self.policy.is_label_studio(err.url):
                raise ImageError(
                    f"Label Studio at LABEL_STUDIO_URL refused LABEL_STUDIO_API_KEY (HTTP "
                    f"{err.status}): check the key"
                ) from None
            raise

    def _download(self, url: str, max_bytes: int, auth: dict[str, str] | None = None) -> bytes:
        """:func:`ml_backend.fetch.fetch` in a slot, within this loader's budget.

        Raises:
            DownloadBudgetSpent: the budget ran out first (its message names the variable).
            FetchError: anything else (generic).
        """
        try:
            with self.budget.download() as slot:
                left = slot.deadline - time.monotonic()
                timeout = min(self.settings.http_timeout, left)
                try:
                    return fetch(url, self.policy, max_bytes=max_bytes, timeout=timeout, auth=auth)
                except FetchError:
                    if left < self.settings.http_timeout and time.monotonic() >= slot.deadline:
                        raise BudgetSpent(waiting=slot.waited) from None
                    raise
        except BudgetSpent as spent:
            logger.warning("image URL %s: %s (STABLESEG_DOWNLOAD_BUDGET)", redact(url), spent)
            raise download_budget_spent(self.settings, spent.waiting) from None

    # ------------------------------------------------------------------ sources
    def _from_data_path(self, path: str, query: str, original: str) -> Image.Image:
        root = self.settings.local_files_document_root
        if path.rstrip("/") == "/data/local-files" and root:
            relative = parse_qs(query).get("d", [""])[0]
            if is_url(root):
                source = image_input(storage_path(root, relative), self.settings.max_image_bytes)
                return open_image(source, self.settings.max_pixels)
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
        data = self.label_studio_bytes(path_and_query, self.settings.max_image_bytes)
        return self._decode(data, self.base_url + path_and_query)

    def _decode(self, data: bytes, url: str) -> Image.Image:
        """The image in downloaded bytes; a failure is as generic as a failed download (what a
        third party serves is not echoed to whoever sent the URL)."""
        try:
            return open_image(data, self.settings.max_pixels)
        except ImageError as err:
            logger.warning("image URL %s is not a usable image: %s", redact(url), err)
            raise FetchError(f"not a usable image: {err}", url) from None

    def _presign_path(self, uri: str, task_id: int | None) -> str:
        if task_id is None:
            raise ImageError(f"cloud storage URI {uri!r} needs the task id to be resolved")
        encoded = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"/tasks/{int(task_id)}/presign/?fileuri={encoded}"
