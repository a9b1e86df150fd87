"""Files in, files out: image discovery, atomic writes, JSON lines, run files.

Every function here takes a local path or a location in object storage
(:class:`~labeler.jobs.storage.RemotePath`, from :func:`~labeler.jobs.storage.as_location`):
on disk a write goes through a temporary file and a rename, in object storage through one
whole upload (see :mod:`labeler.jobs.storage`). Decoding one image (and
:class:`~labeler.images.ImageError`) is the core's (:mod:`labeler.images`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from PIL import Image

from labeler.images import ImageError

from .storage import Location, RemotePath, as_location, redact_text

PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}
"""zlib settings of every mask PNG written: the run-length strategy at level 1, about 3x
faster than PIL's default and at 12 MP half the bytes of plain level 1 (masks are runs of
equal ids)."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _process_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux).

    Elsewhere it is read the only portable way, by setting it and putting it back, once at
    import: a thread creating a file in between could get a wrong mode.
    """
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/self/status", encoding="ascii", errors="replace") as status,
    ):
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_process_umask()
"""The mode of every file :func:`atomic_write_bytes` writes: what ``open()`` would give under
the umask the process started with (0o644 under the usual 022), not the 0o600 of a temporary
file, so other users and containers can read the outputs when the umask lets them."""
FOLDER_MODE = 0o777 & ~_process_umask()  # what mkdir gives (a temporary folder is 0o700)


def _is_image(relative: PurePosixPath) -> bool:
    return relative.name.lower().endswith(IMAGE_EXTENSIONS) and not any(
        part.startswith(".") for part in relative.parts
    )


def list_images(root: str | os.PathLike[str] | RemotePath) -> list[Path]:
    """Every image file under ``root`` (a folder or a URL prefix), recursively, as paths
    relative to it, sorted.

    Hidden files and folders (name starting with '.') are left out; the order is stable across
    machines (sorted by the posix relative path).
    """
    root = as_location(root)
    if isinstance(root, RemotePath):
        found = [Path(rel) for rel in root.walk_files() if _is_image(rel)]
        return sorted(found, key=lambda p: p.as_posix())
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            found.append(Path(folder, name).relative_to(root))
    return sorted(found, key=lambda p: p.as_posix())


def stored_stems(folder: Location, suffix: str) -> set[PurePosixPath]:
    """The files ``<folder>/<stem><suffix>`` that exist, as their stems (``a/b`` for
    ``a/b.json``): one listing, on disk or in object storage (a resume asks once, not once an
    image). Temporary files (``.<name>.<random>.tmp``) are not listed."""
    if isinstance(folder, RemotePath):
        names: Iterator[PurePosixPath] = folder.walk_files()
    elif folder.is_dir():
        names = (
            PurePosixPath(Path(parent, name).relative_to(folder).as_posix())
            for parent, _, files in os.walk(folder)
            for name in files
        )
    else:
        return set()
    return {
        name.with_suffix("")
        for name in names
        if name.name.endswith(suffix) and not name.name.startswith(".")
    }


def remove_tree(location: Location) -> None:
    """Delete a folder and everything in it (in object storage: every object under the
    prefix); nothing when it does not exist."""
    if isinstance(location, RemotePath):
        location.remove_tree()
    else:
        shutil.rmtree(location, ignore_errors=True)


def image_input(location: Location, max_bytes: int | None = None) -> Path | bytes:
    """What :func:`labeler.images.decode_image` reads: a local path as it is, an object's
    bytes (fetched now, in the calling reading thread; at most ``max_bytes`` when given).

    Raises:
        ImageError: the object cannot be read, or is larger than ``max_bytes`` (the reason,
            URLs redacted).
    """
    if not isinstance(location, RemotePath):
        return location
    try:
        if max_bytes is None:
            return location.read_bytes()
        with location.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except (OSError, ValueError) as err:
        reason = redact_text(str(err)) or type(err).__name__
        raise ImageError(f"cannot read {location}: {reason}") from None
    if len(data) > max_bytes:
        raise ImageError(f"{location} is larger than {max_bytes} bytes")
    return data


@contextlib.contextmanager
def atomic_writer(
    path: str | os.PathLike[str] | RemotePath, binary: bool = False
) -> Iterator[IO[Any]]:
    """A handle whose content replaces ``path`` when the block ends: text (UTF-8) or binary.

    The handle is a temporary file in the same folder (``.<name>.<random>.tmp``, so
    :func:`remove_stale_temporaries` cleans up after a kill) with :data:`FILE_MODE`; it is
    flushed, fsynced and renamed over ``path`` when the block ends, and removed when the block
    raises: a kill at any moment leaves the old file or the new one. For files written piece by
    piece (exports assembled in constant memory) as for whole ones.

    In object storage the handle is a local temporary file, uploaded whole when the block ends.
    """
    path = as_location(path)
    if isinstance(path, RemotePath):
        with _upload_when_done(path, binary) as handle:
            yield handle
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        if binary:
            handle: IO[Any] = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding="utf-8", newline="")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _upload_when_done(path: RemotePath, binary: bool) -> Iterator[IO[Any]]:
    """A local temporary file that is uploaded to ``path`` in one piece when the block ends
    without an error, and deleted either way."""
    from .storage import check_writable

    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp")
    try:
        mode = "wb" if binary else "w"
        encoding = None if binary else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding, newline=None if binary else "") as handle:
            yield handle
        path.upload(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str] | RemotePath, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename
    (in object storage: one upload)."""
    path = as_location(path)
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    with atomic_writer(path, binary=True) as handle:
        handle.write(data)


@contextlib.contextmanager
def spool_file(folder: str | os.PathLike[str] | RemotePath, name: str) -> Iterator[IO[str]]:
    """A temporary UTF-8 text file in ``folder`` (read and write), deleted when the block ends.

    Named ``.<name>.<random>.tmp`` like the other temporaries, so a killed run's spools are
    removed by :func:`remove_stale_temporaries`. For a folder in object storage it is a local
    temporary file (the system's temporary folder).
    """
    local = as_location(folder)
    where = None if isinstance(local, RemotePath) else local
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=where)
    try:
        with os.fdopen(fd, "w+", encoding="utf-8", newline="") as handle:
            yield handle
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder that replaces the folder ``path`` when the block ends.

    The folder is ``.<name>.<random>.tmp`` beside ``path``, so :func:`remove_stale_temporaries`
    removes it after a kill; it is removed when the block raises. The old folder is moved
    aside, the new one renamed into place and the old one deleted: a kill leaves either the
    old folder or the new one at ``path`` (and at worst a ``.tmp`` folder to clean up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, FOLDER_MODE)
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(root: str | os.PathLike[str] | RemotePath) -> list[Path]:
    """Delete the temporary files and folders that :func:`atomic_writer` and
    :func:`atomic_folder` leave when a process is killed before their rename
    (``.<name>.<random>.tmp``), anywhere under ``root``.

    Call it only when no writer is active (at the end of a run, after the last barrier): a
    live writer's temporary file matches too. Returns what was removed (nothing in object
    storage, where no temporary is ever stored).
    """
    if isinstance(root, RemotePath):
        return []
    removed = []
    for path in sorted(Path(root).rglob(".*.tmp")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def atomic_write_text(path: str | os.PathLike[str] | RemotePath, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | os.PathLike[str] | RemotePath, obj: Any, indent: int | None = None
) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def image_bytes(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    """Encode a PIL image in memory (to be written atomically)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def read_jsonl(path: str | os.PathLike[str] | RemotePath) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (from a killed writer) is ignored."""
    path = as_location(path)
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def write_jsonl(
    path: str | os.PathLike[str] | RemotePath, records: Iterable[dict[str, Any]]
) -> None:
    """Atomically replace ``path`` with these records, one JSON object a line."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)


def read_json(path: str | os.PathLike[str] | RemotePath, default: Any = None) -> Any:
    """The parsed JSON file, or ``default`` when it does not exist."""
    path = as_location(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


class RunMismatchError(ValueError):
    """An output folder holds a run made with other settings."""


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    """Human-readable differences between two JSON values (nested dicts by dotted key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if len(old) > 8 or len(new) > 8:  # e.g. a pool of images: counts, not a listing
            added, removed = set(new) - set(old), set(old) - set(new)
            changed = [k for k in set(old) & set(new) if old[k] != new[k]]
            if not (added or removed or changed):
                return []
            if len(added) + len(removed) + len(changed) > 3:
                return [
                    f"{key}: {len(added)} added, {len(removed)} removed, {len(changed)} changed"
                ]
        found = []
        for name in sorted(set(old) | set(new)):
            found += _differences(old.get(name), new.get(name), f"{key}.{name}" if key else name)
        return found
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def check_run_file(
    path: str | os.PathLike[str] | RemotePath, expected: dict[str, Any], advice: str
) -> None:
    """Refuse to continue a run whose ``run.json`` at ``path`` differs from ``expected``.

    Nothing happens when the file does not exist (a new run). ``expected`` must carry a
    ``format`` key; a file of another format was written by another version of this tool.

    Raises:
        RunMismatchError: listing what differs, then ``advice`` (how to start again).
    """
    path = as_location(path)
    previous = read_json(path)
    if previous is None:
        return
    if not isinstance(previous, dict) or previous.get("format") != expected.get("format"):
        found = previous.get("format") if isinstance(previous, dict) else None
        raise RunMismatchError(
            f"{path.parent} holds a run of format {found!r} (this version writes "
            f"{expected.get('format')!r}). {advice}"
        )
    changes = _differences(previous, expected)
    if changes:
        shown = "; ".join(changes[:6]) + (
            f"; and {len(changes) - 6} more" if len(changes) > 6 else ""
        )
        raise RunMismatchError(f"{path.parent} holds a run with other settings ({shown}). {advice}")


@dataclass(frozen=True)
class Failure:
    """An input that got no result, and why: the one record of ``skipped.jsonl``, the backend's
    ``errors``, ``label-studio predict``'s failed tasks and ``benchmark.json``'s skipped images.

    Attributes:
        item: what failed: an image path relative to its folder, a Label Studio task id, a
            dataset sample's key.
        reason: why, for a person to read.
        kind: the record's name for ``item`` (``"path"``, ``"task"``, ``"image"``).
    """

    item: Any
    reason: str
    kind: str = "path"

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.item, "reason": self.reason}
