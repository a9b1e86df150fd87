"""Start Training in Label Studio -> ``refine`` (StableSeg+ / ++) on the project's images.

label-studio-ml 1.0.9 does not route ``START_TRAINING`` to ``fit``; the server's webhook view
(and the older ``/train`` call) come here instead. A run goes in the background, one at a time
per project (:mod:`labeler.jobs.refine.background`). The older ``/train`` call carries the
tasks; the ``START_TRAINING`` webhook does not, so the run first lists the project's tasks
through the Label Studio API. Images load exactly as ``/predict`` loads them.

When a run has finished, that project's next ``/predict`` uses its learned attention-map
weights, which gives a new ``model_version``; after a restart the newest finished run on disk
is found again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from labeler.jobs.io import ImageError

from .config import BrushTarget
from .images import ImageLoader
from .settings import BackendSettings

logger = logging.getLogger(__name__)

TASK_PAGE_SIZE = 100


def work_root(settings: BackendSettings) -> Path:
    return Path(settings.refine_dir).expanduser()


def is_training(project_id: str) -> bool:
    """Whether a refine run of this project is in progress in this process."""
    from labeler.jobs.refine.background import get_background_refine

    handle = get_background_refine(project_id)
    return handle is not None and handle.is_running()


def project_settings(settings: BackendSettings, project_id: str | None) -> BackendSettings:
    """The settings for one project's predictions: its refined weights once it has some.

    Weights set explicitly (``STABLESEG_WEIGHTS``) win.
    """
    if not project_id or settings.stableseg.weights is not None:
        return settings
    from labeler.jobs.refine.background import get_background_refine, latest_refine_weights

    handle = get_background_refine(project_id)
    path = handle.weights_path if handle is not None else None
    path = path or latest_refine_weights(work_root(settings), project_id)
    if path is None:
        return settings
    return replace(settings, stableseg=replace(settings.stableseg, weights=Path(path)))


def fetch_project_tasks(loader: ImageLoader, project_id: str) -> list[dict[str, Any]]:
    """Every task of the project, through ``GET /api/tasks?project=ID`` (paged), from
    ``LABEL_STUDIO_URL`` only."""
    import json

    if not loader.base_url or not loader.api_key:
        raise ImageError(
            "Start Training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to list the "
            "project's tasks"
        )
    tasks: list[dict[str, Any]] = []
    page = 1
    while True:
        path = (
            f"/api/tasks?project={int(project_id)}&page={page}"
            f"&page_size={TASK_PAGE_SIZE}&fields=all"
        )
        body = json.loads(loader.label_studio_bytes(path, 100_000_000))
        batch = body.get("tasks", []) if isinstance(body, dict) else body
        tasks += batch
        total = body.get("total", len(tasks)) if isinstance(body, dict) else len(tasks)
        if not batch or len(tasks) >= total:
            return tasks
        page += 1


def _images(
    tasks: Sequence[dict[str, Any]], target: BrushTarget, loader: ImageLoader, project_id: str
) -> list[Any]:
    """Images of every task of the project (the refiner needs no annotation, so the whole
    pool); the tasks Label Studio sent when the API cannot be reached. Bad ones are logged."""
    try:
        tasks = fetch_project_tasks(loader, project_id)
    except ImageError as err:
        if not tasks:
            raise
        logger.warning(
            "cannot list project %s's tasks (%s); using the %d sent", project_id, err, len(tasks)
        )
    images = []
    for task in tasks:
        data = task.get("data") if isinstance(task, dict) else None
        url = data.get(target.data_key) if isinstance(data, dict) else None
        try:
            images.append(loader.load(url, task.get("id")))
        except ImageError as err:
            logger.warning(
                "refine of project %s leaves out task %s: %s", project_id, task.get("id"), err
            )
    logger.info(
        "refine of project %s: %d images from %d tasks", project_id, len(images), len(tasks)
    )
    return images


def refine_options(settings: BackendSettings, labels: Sequence[str]) -> Any:
    """RefineOptions from the backend's settings: the model and segmenter that serve the
    predictions (learned map weights aside: a run learns its own), no progress bars."""
    from labeler.jobs.refine import RefineOptions
    from labeler.train.config import StudentConfig

    student = StudentConfig(
        encoder=settings.refine_encoder,
        encoder_weights=settings.refine_encoder_weights,
        epochs=settings.refine_epochs,
        image_size=settings.refine_image_size,
    )
    return RefineOptions(
        labels=tuple(labels),
        model=settings.model,
        segmenter=settings.stableseg.segmenter.replace(map_weights=None),
        student=student,
        progress=False,
    )


def start_training(
    project_id: str,
    tasks: Sequence[dict[str, Any]],
    target: BrushTarget,
    settings: BackendSettings,
    loader: ImageLoader,
) -> dict[str, Any]:
    """Start a refine run for the project unless one is running; returns a status for the reply."""
    from labeler.jobs.refine.background import start_background_refine

    logger.info("START_TRAINING for project %s (%d tasks given)", project_id, len(tasks))
    if is_training(project_id):
        detail = f"a refine run of project {project_id} is already running"
        logger.info(detail)
        return {"status": "already_running", "project": project_id, "detail": detail}
    if not tasks and not (loader.base_url and loader.api_key):
        detail = (
            "Start Training lists the project's tasks through Label Studio: set "
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the backend"
        )
        logger.error("START_TRAINING for project %s: %s", project_id, detail)
        return {"status": "error", "project": project_id, "detail": detail}
    try:
        options = refine_options(settings, target.prompts)
        handle = start_background_refine(
            project_id,
            lambda: _images(tasks, target, loader, project_id),
            options,
            work_root(settings),
            on_finish=_log_finish,
        )
    except Exception as err:  # a trainer that cannot start must not take the webhook down
        logger.exception("refine run of project %s failed to start", project_id)
        return {"status": "error", "project": project_id, "detail": f"{type(err).__name__}: {err}"}
    logger.info("refine run of project %s started in %s", project_id, handle.work_dir)
    return {
        "status": "started",
        "project": project_id,
        "detail": f"refine run started in {handle.work_dir}",
    }


def _log_finish(handle: Any) -> None:
    if handle.status == "finished":
        logger.info(
            "refine run of project %s finished: %s (model_version of its next predictions changes)",
            handle.project_id,
            handle.weights_path,
        )
    else:
        logger.error("refine run of project %s failed: %s", handle.project_id, handle.error)
