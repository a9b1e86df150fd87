"""Refine runs in a background thread, one at a time (Label Studio's START_TRAINING webhook
starts them).

One run at a time per work root: a run holds an exclusive lock on ``<work_root>/.refine.lock``
(``flock``) while it runs, so a second run, for another project, from this process or another
one sharing the folder (gunicorn workers), is refused with :class:`RefineBusyError` instead of
loading a second Stable Diffusion next to the first. Project ids are positive integers: they
name the run's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from ..io import atomic_write_bytes, image_bytes
from ..refine_options import RefineOptions
from .files import PoolItem
from .run import RefineResult, run_refine
from .workdir import WEIGHTS

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one run at a time per process only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BackgroundRefine",
    "RefineBusyError",
    "get_background_refine",
    "latest_refine_weights",
    "running_refine",
    "start_background_refine",
]


@dataclass
class BackgroundRefine:
    """A refine run in a background thread (one per project at a time).

    Attributes:
        status: ``"running"``, ``"finished"`` or ``"failed"`` (then ``error`` says why).
    """

    project_id: str
    work_dir: Path
    status: str = "running"
    error: str | None = None
    result: RefineResult | None = None
    thread: threading.Thread | None = None

    def is_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (or ``timeout`` s); True when it has ended."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.is_running()

    @property
    def weights_path(self) -> Path | None:
        """W/plusplus/weights.safetensors once the run has finished."""
        return self.result.weights_path if self.result and self.status == "finished" else None

    @property
    def student_path(self) -> Path | None:
        """The last stage's student folder once the run has finished."""
        if self.result is None or self.status != "finished":
            return None
        folders = [p for p in self.result.students.values() if p.is_dir()]
        return folders[-1] if folders else None

    @property
    def model_version(self) -> str | None:
        """``stableseg++-<hash of the weights>``: changes with every new set of weights."""
        path = self.weights_path
        if path is None:
            return None
        return "stableseg++-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]


_RUNS: dict[str, BackgroundRefine] = {}
_RUNS_LOCK = threading.Lock()
LOCK_FILE = ".refine.lock"


class RefineBusyError(RuntimeError):
    """A refine run is in progress (``project``: its project id); the message names it."""

    def __init__(self, message: str, project: str) -> None:
        super().__init__(message)
        self.project = project


def _project_key(project_id: str | int) -> str:
    """The project id as the folder name part ``project-<id>``: a positive integer."""
    key = str(project_id)
    if not (key.isascii() and key.isdigit() and not key.startswith("0")):
        raise ValueError(f"project id must be a positive integer, got {str(project_id)[:40]!r}")
    return key


def _take_run_lock(work_root: Path, key: str) -> int | None:
    """Lock ``work_root/.refine.lock`` for a run of project ``key``; the descriptor to close
    when the run ends (None where ``flock`` does not exist).

    Raises:
        RefineBusyError: a run (of another process sharing the folder) holds it.
    """
    if fcntl is None:
        return None
    work_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        running = _read_project(fd)
        os.close(fd)
        message = _busy_message(f"project {running or '?'}", " (in another process)")
        raise RefineBusyError(message, running) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, key.encode("ascii"), 0)
    return fd


HOLDER_WAIT_S = 1.0  # how long a refused run waits for the lock's holder to write its project


def _read_project(fd: int) -> str:
    """The project written in the lock file by the process holding the lock.

    The holder writes it just after taking the lock, so a reader that finds the lock taken may
    come in between: it reads again for up to :data:`HOLDER_WAIT_S` before giving up ("")."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        project = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if project or time.monotonic() >= deadline:
            return project
        time.sleep(0.02)


def running_refine(work_root: str | os.PathLike[str]) -> str | None:
    """The project whose refine run is in progress with this work root, in this process or
    another one (gunicorn's other workers), or None."""
    with _RUNS_LOCK:
        running = [run.project_id for run in _RUNS.values() if run.is_running()]
    if running:
        return running[0]
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(work_root) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no run has ever started here
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_project(fd) or None
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return None


def _busy_message(running: str, where: str = "") -> str:
    return (
        f"a refine run of {running} is in progress{where}; this backend runs one at a time. "
        "Start Training again when it has finished."
    )


def _materialise(images: Iterable[Any], work_dir: Path) -> list[PoolItem]:
    """Local paths stay where they are; PIL images are saved under W/pool/ as PNG as they
    come (an iterator of downloads is never held in memory as a whole)."""
    items = []
    for index, image in enumerate(images):
        if isinstance(image, Image.Image):
            path = work_dir / "pool" / f"{index:05d}.png"
            atomic_write_bytes(path, image_bytes(image.convert("RGB")))
            items.append(PoolItem(f"{index:05d}", path))
        else:
            path = Path(image)
            items.append(PoolItem(f"{index:05d}_{path.stem}", path))
    return items


def start_background_refine(
    project_id: str | int,
    images: Iterable[str | os.PathLike[str] | Image.Image]
    | Callable[[], Iterable[str | os.PathLike[str] | Image.Image]],
    options: RefineOptions,
    work_root: str | os.PathLike[str],
    *,
    on_finish: Callable[[BackgroundRefine], None] | None = None,
) -> BackgroundRefine:
    """Start ``refine`` on a project's images in a background thread and return at once.

    One run at a time: while this project's run is running, that run is returned and nothing
    new starts; while another project's run is running (in this process, or in another one
    with the same ``work_root``), :class:`RefineBusyError` is raised. Each new run gets its own
    folder ``<work_root>/project-<id>/run-<UTC time>``; :func:`latest_refine_weights` finds the
    newest finished one after a restart. The run loads its own Stable Diffusion (the backend's
    copy is not shared: recording attention changes the UNet's processors while a pass runs),
    through :func:`labeler.jobs.models.load_stableseg`, whose lock makes loads in one process
    safe while the backend loads its own copy.

    Args:
        project_id: a positive integer (``ValueError`` otherwise).
        images: local paths and/or already downloaded PIL images (at least 2 readable), or a
            function returning them, called in the worker thread (so slow downloads do not
            hold up the caller); an iterator is consumed one image at a time.
        options: the run's labels, model, segmenter and trainer settings; progress bars are
            turned off.
        on_finish: called in the worker thread with the run when it ends (either way).
    """
    key = _project_key(project_id)
    with _RUNS_LOCK:
        current = _RUNS.get(key)
        if current is not None and current.is_running():
            return current
        running = [run.project_id for run in _RUNS.values() if run.is_running()]
        if running:
            raise RefineBusyError(_busy_message(f"project {running[0]}"), running[0])
        lock_fd = _take_run_lock(Path(work_root), key)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        work_dir = Path(work_root) / f"project-{key}" / f"run-{stamp}"
        run_options = replace(options, progress=False)
        handle = BackgroundRefine(project_id=key, work_dir=work_dir)

        def work() -> None:
            try:
                pool = _materialise(images() if callable(images) else images, work_dir)
                handle.result = run_refine(pool, work_dir, run_options)
                handle.status = "finished"
            except Exception as err:  # reported through the handle, not raised in a thread
                log.exception("background refine of project %s failed", key)
                handle.status, handle.error = "failed", f"{type(err).__name__}: {err}"
            finally:
                if lock_fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(lock_fd)  # releases the flock: the next run may start
            if on_finish is not None:
                on_finish(handle)

        handle.thread = threading.Thread(target=work, name=f"refine-{key}", daemon=True)
        try:
            handle.thread.start()
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        _RUNS[key] = handle
        return handle


def get_background_refine(project_id: str | int) -> BackgroundRefine | None:
    """The latest run started in this process for the project (running or not)."""
    with _RUNS_LOCK:
        return _RUNS.get(str(project_id))


def latest_refine_weights(work_root: str | os.PathLike[str], project_id: str | int) -> Path | None:
    """weights.safetensors of the newest finished run of the project on disk, or None."""
    key = _project_key(project_id)
    runs = sorted((Path(work_root) / f"project-{key}").glob("run-*"), reverse=True)
    for folder in runs:
        report_file = folder / "report.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else None
        weights = folder / WEIGHTS
        if report and report.get("finished") and weights.exists():
            return weights
    return None
