"""Object storage in and out: a folder is a local path or an fsspec URL.

**The API** (what the jobs and engines call; :mod:`labeler.jobs.io` builds on it):

* :func:`as_location` ``(text) -> Location``: ``s3://bucket/prefix``, ``gs://…``, ``az://…``,
  ``https://…`` become a :class:`RemotePath`; anything else (``file://`` included) a
  :class:`pathlib.Path`, ``~`` expanded. ``Location = Path | RemotePath``.
* :class:`RemotePath` has the part of :class:`pathlib.Path` the jobs use: ``/``, ``name``,
  ``parent``, ``exists()``, ``is_dir()``, ``read_bytes()``, ``read_text()``, ``open()``,
  ``mkdir()`` (nothing to do), ``write_bytes()`` (one whole object). It holds only its URL, so it
  pickles to any process (a Ray worker, a torchrun rank), which finds its own filesystem object.
  ``str()`` is the URL redacted (:func:`redact_url`); ``.url`` is the URL itself.
* :func:`check_writable` ``(location, what)``: refuses, at once, an output URL whose writes are
  not atomic (``https://``, ``ftp://``, ...).
* The writers and readers are :mod:`labeler.jobs.io`'s, which take either kind of location:
  ``list_images``, ``atomic_writer``, ``atomic_write_bytes`` / ``_text`` / ``_json``,
  ``read_json``, ``read_jsonl``, ``write_jsonl``, ``stored_stems`` (one listing of what a folder
  holds), ``remove_tree``, ``image_input`` (a path or the bytes, for
  :func:`labeler.images.decode_image`).

**Why a whole object is safe.** S3, Google Cloud Storage and Azure Blob Storage make an object
visible only when its upload has completed (a single PUT, or a multipart / resumable upload
committed in one call), and a new upload replaces the old object whole. So every output is
uploaded in one piece: bytes made in memory go up in one request, and files written piece by
piece (the exports, streamed in constant memory) are spooled to a local temporary file and
uploaded when complete. A kill leaves no partial object: at worst an upload that never
completed, which the store discards. Protocols without that guarantee are refused as outputs.

**What is a result.** Object stores have no rename, so "write a temporary, then rename" cannot
mark completion. Instead each image's record (``records/<rel>.json``) is uploaded only after
every other object of the image: the records are the run's manifest. A resume lists
``records/`` once (:func:`labeler.jobs.io.stored_stems`) and labels only the images not listed;
the exports are assembled from the listed images only. A mask or pieces object without its
record (a kill between two uploads) is not a result; the resumed run uploads it again, and the
new upload replaces it whole. See ``docs/storage.md``.

**Credentials** come from where each client looks for them (``AWS_*`` variables, profiles and
instance roles for S3; ``GOOGLE_APPLICATION_CREDENTIALS`` and gcloud's for GCS;
``AZURE_STORAGE_*`` for Azure); this module never reads, prints or logs them, and every message
shows URLs through :func:`redact_url` (no ``user:password@``, no query string: pre-signed URLs
carry their signature there).

**Clients are optional extras.** ``s3://`` needs ``s3fs`` (``pip install -e ".[s3]"``),
``gs://`` ``gcsfs`` (``[gcs]``), ``az://`` ``adlfs`` (``[azure]``), ``https://`` ``aiohttp``
(``[http]``); a missing one fails at once (:class:`~labeler.jobs.extras.MissingExtraError`)
with the install hint; :func:`parse_location` makes it a :class:`ValueError` for the commands.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, Any, TypeAlias
from urllib.parse import unquote, urlsplit

from .extras import MissingExtraError, require_extra

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_URL_ANYWHERE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://[^\s'\"<>]+")

EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
    "http": "http",
    "https": "http",
}
"""URL scheme -> the project's optional extra that installs its client."""

EXTRA_PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs", "http": "aiohttp"}
"""Extra -> the package it installs (and that fsspec imports for the scheme)."""

ATOMIC_WRITES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
"""Schemes where an upload becomes visible whole or not at all: the only ones allowed as
outputs (``memory://``: fsspec's in-process store, for tests)."""


def is_url(text: str) -> bool:
    """Whether ``text`` is a URL with a scheme other than ``file`` (a remote location)."""
    match = _URL.match(text)
    return bool(match) and match.group(1).lower() != "file"


def redact_url(url: str) -> str:
    """``url`` as messages and logs show it: no ``user:password@`` and no query string
    (pre-signed URLs carry their keys there), except Label Studio's local-files URLs, whose
    query is the file's path."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        query = parts.query if "local-files" in parts.path else ""
        return parts._replace(netloc=netloc, query=query, fragment="").geturl()
    except ValueError:
        return "<unparsable URL>"


def redact_text(text: str) -> str:
    """``text`` (an error message from a client library) with every URL in it redacted."""
    return _URL_ANYWHERE.sub(lambda m: redact_url(m.group(0)), text)


_lock = threading.Lock()
_filesystems: dict[tuple[str, int], Any] = {}  # (scheme, pid): a forked child makes its own


def filesystem(protocol: str) -> Any:
    """The fsspec filesystem for a URL scheme, made once per process (credentials and endpoint
    from the client's usual places: environment, profiles).

    Raises:
        MissingExtraError: the scheme's client is not installed (with the install hint).
        ValueError: a scheme fsspec does not know.
    """
    protocol = protocol.lower()
    extra = EXTRAS.get(protocol)
    if extra is not None:
        require_extra(EXTRA_PACKAGES[extra], extra, f"a {protocol}:// URL")
    key = (protocol, os.getpid())
    with _lock:
        found = _filesystems.get(key)
        if found is not None:
            return found
        import fsspec

        try:
            cls = fsspec.get_filesystem_class(protocol)
        except ImportError as err:
            raise MissingExtraError(f"a {protocol}:// URL needs a client: {err}") from None
        except ValueError:
            raise ValueError(
                f"unknown URL scheme {protocol}://; use a local path or one of "
                f"{', '.join(f'{s}://' for s in ('s3', 'gs', 'az', 'https'))}"
            ) from None
        found = _filesystems[key] = cls()
        return found


@dataclass(frozen=True)
class RemotePath:
    """A file or folder in object storage (or behind ``https://``), addressed by its URL.

    Only the URL is stored: the filesystem object is found per process (:func:`filesystem`).
    A folder is a key prefix: it exists when something is stored under it, and ``mkdir`` has
    nothing to do.
    """

    url: str

    def __post_init__(self) -> None:
        match = _URL.match(self.url)
        if not match:
            raise ValueError(f"not a URL: {redact_url(self.url)!r}")
        if len(self.url) > len(match.group(0)) and self.url.endswith("/"):
            object.__setattr__(self, "url", self.url.rstrip("/"))

    # ------------------------------------------------------------------ names
    @property
    def protocol(self) -> str:
        match = _URL.match(self.url)
        assert match is not None
        return match.group(1).lower()

    @property
    def fs(self) -> Any:
        return filesystem(self.protocol)

    @property
    def path(self) -> str:
        """The path as the filesystem takes it (``bucket/key`` for S3, the URL for https)."""
        return self.fs._strip_protocol(self.url)

    @property
    def name(self) -> str:
        return PurePosixPath(urlsplit(self.url).path).name or urlsplit(self.url).netloc

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> RemotePath:
        head, _, tail = self.url.rpartition("/")
        return self if not tail or head.endswith(":/") else RemotePath(head)

    def __truediv__(self, other: str | os.PathLike[str]) -> RemotePath:
        if urlsplit(self.url).query:
            raise ValueError(
                f"{redact_url(self.url)}: a folder URL cannot carry a query string (a signed URL "
                "names one file)"
            )
        part = other.as_posix() if isinstance(other, PurePath) else os.fspath(other)
        part = part.strip("/")
        return RemotePath(f"{self.url}/{part}") if part else self

    def __str__(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def as_posix(self) -> str:
        return str(self)

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "r", encoding: str | None = None, **kwargs: Any) -> IO[Any]:
        """A handle on the object (reading; a writer uploads as it goes: use
        :func:`labeler.jobs.io.atomic_writer` for outputs)."""
        if "b" not in mode:
            kwargs["encoding"] = encoding or "utf-8"
        return self.fs.open(self.path, mode, **kwargs)

    def walk_files(self) -> Iterator[PurePosixPath]:
        """Every object under this folder, as paths relative to it (one listing, paginated by
        the client; nothing for a folder that holds nothing)."""
        fs, root = self.fs, self.path
        fs.invalidate_cache(root)  # another process may have written since this one listed
        try:
            found = fs.find(root, withdirs=False, detail=False)
        except FileNotFoundError:
            return
        prefix = root.rstrip("/") + "/"
        quoted = self.protocol in ("http", "https")  # links on a page are URL-quoted; keys not
        for item in found:
            item = fs._strip_protocol(item) if _URL.match(item) else item
            if item.startswith(prefix) and not item.endswith("/"):
                relative = item[len(prefix) :]
                yield PurePosixPath(unquote(relative) if quoted else relative)

    # ------------------------------------------------------------------ writing
    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Nothing to do: a prefix exists once an object is stored under it."""

    def write_bytes(self, data: bytes) -> None:
        """Store ``data`` as this object, in one upload (visible whole or not at all)."""
        check_writable(self)
        self.fs.pipe_file(self.path, data)

    def upload(self, local: str | os.PathLike[str]) -> None:
        """Store a complete local file as this object, in one upload."""
        check_writable(self)
        self.fs.put_file(os.fspath(local), self.path)

    def remove_tree(self) -> None:
        """Delete every object under this prefix (batched by the client: S3 deletes 1,000 keys
        a request); nothing when it holds none."""
        check_writable(self)
        fs, root = self.fs, self.path
        fs.invalidate_cache(root)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(root, recursive=True)
        fs.invalidate_cache(root)


Location: TypeAlias = Path | RemotePath
"""Where a folder or file is: on this machine, or behind a URL."""


def as_location(value: str | os.PathLike[str] | RemotePath) -> Location:
    """A location from a command-line value: a URL becomes a :class:`RemotePath` (its client is
    checked at once: :class:`~labeler.jobs.extras.MissingExtraError`), ``file://`` and anything
    else a
    :class:`~pathlib.Path` (``~`` expanded)."""
    if isinstance(value, RemotePath | Path):
        return value
    text = os.fspath(value)
    if is_url(text):
        location = RemotePath(text)
        location.fs  # noqa: B018 (a missing client fails now, not at the first image)
        return location
    if text.lower().startswith("file://"):
        text = unquote(urlsplit(text).path)
    return Path(os.path.expanduser(text))


def relative_posix(location: Location, root: Location) -> str | None:
    """``location``'s path under ``root`` (posix), or None when it is not under it."""
    if isinstance(location, RemotePath) or isinstance(root, RemotePath):
        if not (isinstance(location, RemotePath) and isinstance(root, RemotePath)):
            return None
        prefix = root.url + "/"
        return location.url[len(prefix) :] if location.url.startswith(prefix) else None
    return location.relative_to(root).as_posix() if location.is_relative_to(root) else None


def parse_location(text: str) -> Location:
    """:func:`as_location` as a setting's or an argument's parser: a missing client is a
    :class:`ValueError` (a usage error, with the install hint)."""
    try:
        return as_location(text)
    except MissingExtraError as err:
        raise ValueError(str(err)) from None


def check_writable(location: Location, what: str = "the output") -> None:
    """Refuse an output location whose uploads are not atomic (see the module).

    Raises:
        ValueError: naming the scheme and the ones that work.
    """
    if isinstance(location, RemotePath) and location.protocol not in ATOMIC_WRITES:
        raise ValueError(
            f"{what} cannot be written to {location.protocol}:// ({location}): its uploads are "
            "not atomic. Use a local folder or s3://, gs://, az://"
        )


def describe(location: Location) -> str:
    """How a run file records a location: a local folder resolved, a URL redacted."""
    return str(location) if isinstance(location, RemotePath) else str(Path(location).resolve())
