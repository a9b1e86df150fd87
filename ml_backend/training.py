"""Start Training in Label Studio -> ``refine`` (StableSeg+ / ++) on the project's images.

label-studio-ml 1.0.9 does not route ``START_TRAINING`` to ``fit``; the server's webhook view
(and the older ``/train`` call) come here instead. A run goes in the background, one at a time
per backend (:mod:`labeler.jobs.refine.threaded`): Start Training for another project while
one runs gets 409 and a message (it is not queued: a run takes long, and Label Studio shows the
message, so pressing the button again when the run has finished is clearer than a hidden queue);
for the running project it answers ``already_running``.

The project id must be a positive integer (it names the run's folder). The run lists the
project's tasks through the Label Studio API at ``LABEL_STUDIO_URL`` with
``LABEL_STUDIO_API_KEY``, never from the request: tasks in a request body (the older ``/train``
call's ``annotations``) are ignored, since whoever can reach the backend could name any image
there. Images load exactly as ``/predict`` loads them.

When a run has finished, that project's next ``/predict`` uses its learned attention-map
weights, which gives a new ``model_version``; after a restart the newest finished run on disk
is found again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from labeler.images import ImageError

from .backend_settings import BackendSettings
from .images import ImageLoader
from .label_config import BrushTarget

logger = logging.getLogger(__name__)

TASK_PAGE_SIZE = 100
_PROJECT = re.compile(r"[1-9][0-9]{0,17}(?:\.[0-9]{1,20})?")


def parse_project_id(value: Any) -> int:
    """Label Studio's project id as an int: ``7``, ``"7"`` or ``"7.1700000000"`` (``/setup``,
    ``/predict`` and ``/train`` send ``ID.CREATED_AT``).

    Raises:
        ValueError: anything else (it would name a folder: ``../../tmp/x`` must not).
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**18:
        return value
    if isinstance(value, str) and _PROJECT.fullmatch(value.strip()):
        return int(value.strip().split(".")[0])
    shown = repr(value[:40] + "..." if isinstance(value, str) and len(value) > 40 else value)
    raise ValueError(
        f"the project id must be a positive integer (or 'ID.TIMESTAMP' as Label Studio sends "
        f"it), got {shown}"
    )


def work_root(settings: BackendSettings) -> Path:
    return Path(settings.refine_dir).expanduser()


def is_training(project_id: int, settings: BackendSettings) -> bool:
    """Whether a refine run of this project is in progress, in this worker or another one."""
    from labeler.jobs.refine.threaded import running_refine

    return running_refine(work_root(settings)) == str(project_id)


def project_settings(settings: BackendSettings, project_id: int | None) -> BackendSettings:
    """The settings for one project's predictions: its refined weights once it has some.

    Weights set explicitly (``STABLESEG_WEIGHTS``) win.
    """
    if project_id is None or settings.stableseg.weights is not None:
        return settings
    from labeler.jobs.refine.threaded import get_background_refine, latest_refine_weights

    handle = get_background_refine(project_id)
    path = handle.weights_path if handle is not None else None
    path = path or latest_refine_weights(work_root(settings), project_id)
    if path is None:
        return settings
    return replace(settings, stableseg=replace(settings.stableseg, weights=Path(path)))


def iter_project_tasks(loader: ImageLoader, project_id: int) -> Iterator[dict[str, Any]]:
    """Every task of the project, through ``GET /api/tasks?project=ID`` (paged), from
    ``LABEL_STUDIO_URL`` only; one page in memory at a time."""
    import json

    if not loader.base_url or not loader.api_key:
        raise ImageError(
            "Start Training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to list the "
            "project's tasks"
        )
    seen = 0
    page = 1
    while True:
        path = (
            f"/api/tasks?project={int(project_id)}&page={page}"
            f"&page_size={TASK_PAGE_SIZE}&fields=all"
        )
        body = json.loads(loader.label_studio_bytes(path, 100_000_000))
        batch = body.get("tasks", []) if isinstance(body, dict) else body
        yield from batch
        seen += len(batch)
        total = body.get("total", seen) if isinstance(body, dict) else seen
        if not batch or seen >= total:
            return
        page += 1


def fetch_project_tasks(loader: ImageLoader, project_id: int) -> list[dict[str, Any]]:
    """:func:`iter_project_tasks` as a list."""
    return list(iter_project_tasks(loader, project_id))


def _images(target: BrushTarget, loader: ImageLoader, project_id: int) -> Iterator[Any]:
    """Images of every task of the project (the refiner needs no annotation, so the whole
    pool), listed through the Label Studio API and loaded one at a time as the run writes its
    pool (so memory holds one image, not the project). Bad ones are logged and left out."""
    loaded = tasks = 0
    for task in iter_project_tasks(loader, project_id):
        tasks += 1
        data = task.get("data") if isinstance(task, dict) else None
        url = data.get(target.data_key) if isinstance(data, dict) else None
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            image = loader.load(url, task_id)
        except ImageError as err:
            logger.warning("refine of project %s leaves out task %s: %s", project_id, task_id, err)
            continue
        loaded += 1
        yield image
    logger.info("refine of project %s: %d images from %d tasks", project_id, loaded, tasks)


def refine_options(settings: BackendSettings, labels: Sequence[str]) -> Any:
    """RefineOptions from the backend's settings: the model and segmenter that serve the
    predictions (learned map weights aside: a run learns its own), no progress bars."""
    from labeler.jobs.refine_options import RefineOptions

    return RefineOptions(
        labels=tuple(labels),
        model=settings.model,
        segmenter=settings.stableseg.segmenter.replace(map_weights=None),
        student=settings.student,
        progress=False,
    )


def start_training(
    project_id: int, target: BrushTarget, settings: BackendSettings, loader: ImageLoader
) -> tuple[int, dict[str, Any]]:
    """Start a refine run for the project unless one is running.

    Returns:
        The HTTP status and the reply: 201 ``started`` or ``already_running`` (this project's
        run), 409 ``busy`` (another project's run), 503 ``error`` without ``LABEL_STUDIO_URL``
        and ``LABEL_STUDIO_API_KEY``, 500 ``error`` when the run cannot start.
    """
    from labeler.jobs.refine.threaded import RefineBusyError, start_background_refine

    logger.info("START_TRAINING for project %s", project_id)
    already = {
        "status": "already_running",
        "project": project_id,
        "detail": f"a refine run of project {project_id} is already running",
    }
    if is_training(project_id, settings):
        logger.info(already["detail"])
        return 201, already
    if not (loader.base_url and loader.api_key):
        detail = (
            "Start Training lists the project's tasks through Label Studio: set "
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the backend"
        )
        logger.error("START_TRAINING for project %s: %s", project_id, detail)
        return 503, {"status": "error", "project": project_id, "detail": detail}
    try:
        options = refine_options(settings, target.prompts)
        handle = start_background_refine(
            project_id,
            lambda: _images(target, loader, project_id),
            options,
            work_root(settings),
            on_finish=_log_finish,
        )
    except RefineBusyError as err:
        if err.project == str(project_id):  # started meanwhile, by another worker
            return 201, already
        logger.warning("START_TRAINING for project %s refused: %s", project_id, err)
        return 409, {"status": "busy", "project": project_id, "detail": str(err)}
    except Exception as err:  # a trainer that cannot start must not take the webhook down
        logger.exception("refine run of project %s failed to start", project_id)
        detail = f"{type(err).__name__}: {err}"
        return 500, {"status": "error", "project": project_id, "detail": detail}
    logger.info("refine run of project %s started in %s", project_id, handle.work_dir)
    detail = f"refine run started in {handle.work_dir}"
    return 201, {"status": "started", "project": project_id, "detail": detail}


def _log_finish(handle: Any) -> None:
    if handle.status == "finished":
        logger.info(
            "refine run of project %s finished: %s (model_version of its next predictions changes)",
            handle.project_id,
            handle.weights_path,
        )
    else:
        logger.error("refine run of project %s failed: %s", handle.project_id, handle.error)
