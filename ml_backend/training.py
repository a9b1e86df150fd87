"""Label Studio's ``START_TRAINING`` webhook -> the StableSeg+/++ refine trainer, one run a project.

label-studio-ml 1.0.9 does not route ``START_TRAINING`` to ``fit``; the server's webhook view
calls :func:`start_training` instead. The trainer lives in ``jobs.refine`` as
``start_background_refine(project_id, tasks, **options)``; until that module exists the answer
says so. A run counts as running while the call is in progress and, when the call returns an
object with ``is_alive()`` (a thread or process), for as long as that object is alive.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .settings import BackendSettings

logger = logging.getLogger(__name__)

REFINE_MODULE = "jobs.refine"
REFINE_FUNCTION = "start_background_refine"

_lock = threading.Lock()
_runs: dict[str, Any] = {}  # project id -> the run's handle (or True while the call runs)


def find_refine_starter() -> Callable[..., Any] | None:
    """``jobs.refine.start_background_refine`` when the trainer is installed, else None."""
    try:
        module = importlib.import_module(REFINE_MODULE)
    except ModuleNotFoundError as err:
        if err.name not in (REFINE_MODULE, REFINE_MODULE.split(".")[0]):
            raise  # the trainer exists but one of its own imports is missing
        return None
    return getattr(module, REFINE_FUNCTION, None)


def is_training(project_id: str) -> bool:
    """Whether a refine run of this project is in progress."""
    with _lock:
        return _is_running(_runs.get(project_id))


def _is_running(handle: Any) -> bool:
    if handle is None:
        return False
    alive = getattr(handle, "is_alive", None)
    return bool(alive()) if callable(alive) else handle is True


def start_training(
    project_id: str,
    tasks: Sequence[dict[str, Any]],
    label_config: str | None,
    settings: BackendSettings,
) -> dict[str, Any]:
    """Start a refine run for the project unless one is running; returns a status for the reply."""
    starter = find_refine_starter()
    if starter is None:
        detail = (
            "refine trainer not available yet: START_TRAINING for project "
            f"{project_id} acknowledged, nothing started ({REFINE_MODULE}.{REFINE_FUNCTION} "
            "is not installed)"
        )
        logger.warning(detail)
        return {"status": "unavailable", "project": project_id, "detail": detail}
    with _lock:
        if _is_running(_runs.get(project_id)):
            detail = f"a refine run of project {project_id} is already running"
            logger.info(detail)
            return {"status": "already_running", "project": project_id, "detail": detail}
        _runs[project_id] = True
    try:
        handle = starter(
            project_id,
            list(tasks),
            label_config=label_config,
            model=settings.model,
            device=settings.device,
            dtype=settings.dtype,
            weights=settings.weights,
        )
    except Exception as err:
        with _lock:
            _runs.pop(project_id, None)
        logger.exception("refine run of project %s failed to start", project_id)
        return {"status": "error", "project": project_id, "detail": f"{type(err).__name__}: {err}"}
    with _lock:
        _runs[project_id] = handle if callable(getattr(handle, "is_alive", None)) else None
    logger.info("refine run of project %s started", project_id)
    return {"status": "started", "project": project_id, "detail": "refine run started"}
