"""Refine runs in a background thread, one per project at a time (Label Studio's
START_TRAINING webhook starts them)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from ..io import atomic_write_bytes, image_bytes
from .files import PoolItem
from .options import RefineOptions
from .run import RefineResult, run_refine
from .steps import WEIGHTS

log = logging.getLogger(__name__)

__all__ = [
    "BackgroundRefine",
    "get_background_refine",
    "latest_refine_weights",
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


def _materialise(images: Sequence[Any], work_dir: Path) -> list[PoolItem]:
    """Local paths stay where they are; PIL images are saved under W/pool/ as PNG."""
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
    images: Sequence[str | os.PathLike[str] | Image.Image]
    | Callable[[], Sequence[str | os.PathLike[str] | Image.Image]],
    options: RefineOptions,
    work_root: str | os.PathLike[str],
    *,
    on_finish: Callable[[BackgroundRefine], None] | None = None,
) -> BackgroundRefine:
    """Start ``refine`` on a project's images in a background thread and return at once.

    One run at a time per project: while one is running, that run is returned and nothing new
    starts. Each new run gets its own folder ``<work_root>/project-<id>/run-<UTC time>``;
    :func:`latest_refine_weights` finds the newest finished one after a restart. The run loads
    its own Stable Diffusion (the backend's copy is not shared: recording attention changes the
    UNet's processors while a pass runs).

    Args:
        images: local paths and/or already downloaded PIL images (at least 2 readable), or a
            function returning them, called in the worker thread (so slow downloads do not
            hold up the caller).
        options: the run's labels, model, segmenter and trainer settings; progress bars are
            turned off.
        on_finish: called in the worker thread with the run when it ends (either way).
    """
    key = str(project_id)
    with _RUNS_LOCK:
        current = _RUNS.get(key)
        if current is not None and current.is_running():
            return current
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        work_dir = Path(work_root) / f"project-{key}" / f"run-{stamp}"
        run_options = replace(options, progress=False)
        handle = BackgroundRefine(project_id=key, work_dir=work_dir)

        def work() -> None:
            try:
                pool = _materialise(list(images() if callable(images) else images), work_dir)
                handle.result = run_refine(pool, work_dir, run_options)
                handle.status = "finished"
            except Exception as err:  # reported through the handle, not raised in a thread
                log.exception("background refine of project %s failed", key)
                handle.status, handle.error = "failed", f"{type(err).__name__}: {err}"
            if on_finish is not None:
                on_finish(handle)

        handle.thread = threading.Thread(target=work, name=f"refine-{key}", daemon=True)
        _RUNS[key] = handle
        handle.thread.start()
        return handle


def get_background_refine(project_id: str | int) -> BackgroundRefine | None:
    """The latest run started in this process for the project (running or not)."""
    with _RUNS_LOCK:
        return _RUNS.get(str(project_id))


def latest_refine_weights(work_root: str | os.PathLike[str], project_id: str | int) -> Path | None:
    """weights.safetensors of the newest finished run of the project on disk, or None."""
    runs = sorted((Path(work_root) / f"project-{project_id}").glob("run-*"), reverse=True)
    for folder in runs:
        report_file = folder / "report.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else None
        weights = folder / WEIGHTS
        if report and report.get("finished") and weights.exists():
            return weights
    return None
