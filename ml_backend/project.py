"""Whole-project predictions for Label Studio: ``stableseg label-studio predict``.

Label Studio's own *Retrieve Predictions* sends every selected task to the backend in one
request and gives up after 100 s. This job lists the project's tasks a page at a time, labels
them in full batches and uploads the predictions in small import requests, so no request grows
with the project and a run of any length can be interrupted and resumed.

The predictions are the backend's, byte for byte, for the same settings: the labels come from
the project's labeling config through :func:`ml_backend.label_config.parse_label_config`,
images are read by :class:`ml_backend.images.ImageLoader` (``LOCAL_FILES_DOCUMENT_ROOT``, else
through ``--url`` with the key; the same allow-list), masks come from the model stage exactly as
the backend's ``/predict`` calls it (:func:`ml_backend.predictions.segment_tasks`) and are
encoded by :func:`ml_backend.predictions.build_prediction`, with the model version of the
backend's model cache.

The stages are separate functions over iterators (task stream -> segmented -> predictions ->
upload):

* :func:`list_tasks`: the project's tasks, page by page, in id order;
* :func:`~ml_backend.predictions.segment_tasks`: each task's image read in a small bounded
  thread pool ahead of the model, and segmented in full batches (the model stage);
* :func:`encode`: each result as a Label Studio prediction;
* :class:`Uploader`: predictions to Label Studio, a few tasks per request, with retries.

Resuming: a task that already holds a prediction of this model version is skipped. An upload
either stores a whole batch or none of it, and before a batch is sent again after a timeout or
a server error, the tasks it did store are taken out of it: no task is predicted twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from labeler.jobs.io import Failure, write_jsonl
from labeler.jobs.stage import Segmented
from labeler.model_settings import ModelSettings
from labeler.settings import group, integer, number, setting, settings_group

from . import cache
from .backend_settings import BackendSettings
from .images import ImageLoader
from .label_config import BrushTarget, LabelConfigError, parse_label_config
from .predictions import build_prediction, segment_tasks

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

log = logging.getLogger(__name__)

T = TypeVar("T")

TASK_FIELDS = "id,data,predictions_model_versions"
"""What a task listing asks for: no predictions' results (they hold whole brush RLEs)."""
ORDER_BY_ID = json.dumps({"ordering": ["tasks:id"]})
MAX_BACKOFF_S = 30.0
EXTRA_PAGES = 2
"""Pages a listing may run past those the project's task count fills (tasks added while the
run lists them) before the listing is taken for a server that pages forever."""
MAX_UPLOAD_BYTES = 8_000_000
"""An upload request is sent early when its JSON would grow past this."""


class LabelStudioUsageError(ValueError):
    """A wrong URL, key, project or labeling config: the message says what to change."""


class LabelStudioUnavailable(RuntimeError):
    """Label Studio could not be reached or kept failing after the retries."""


def _http_url(value: str) -> str:
    url = value.strip()
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} is not an http(s) URL")
    return url


@settings_group("label-studio predict")
@dataclass(frozen=True)
class PredictOptions:
    """Settings of one ``label-studio predict`` run (declared: the command's options and its
    ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY`` and ``STABLESEG_*`` variables are made from
    these fields).

    Attributes:
        url: Label Studio's address (also where images under ``/data/`` are fetched from).
        project: the project's id.
        api_key: a personal access token (JWT) or a legacy token.
        settings: the model and segmenter, as ``serve`` takes them.
        page_size: tasks per listing request.
        upload_batch: tasks per upload request.
        max_upload_bytes: an upload request is sent early when its JSON would grow past this.
        decode_workers: threads reading and decoding images ahead of the model.
        timeout: seconds for one request to Label Studio.
        retries: attempts after the first for a request that timed out or met a server error
            (5xx, 429), waiting 1, 2, 4, ... up to 30 s in between.
        failed_log: JSON-lines file listing the tasks that failed, and why.
    """

    url: str = field(
        metadata=setting(
            "Label Studio's address, as its task URLs name it.",
            parse=_http_url,
            env_prefix="LABEL_STUDIO_",
            metavar="URL",
        )
    )
    project: int = field(
        metadata=setting("The project's id.", parse=integer(minimum=1), metavar="ID")
    )
    api_key: str = field(
        metadata=setting(
            "A Label Studio personal access token (Account & Settings > Personal Access Token) "
            "or a legacy token; never a command-line option, which other users could read.",
            env_prefix="LABEL_STUDIO_",
            option=False,
        ),
        repr=False,
    )
    settings: ModelSettings = field(default_factory=ModelSettings, metadata=group())
    page_size: int = field(
        default=100,
        metadata=setting("Tasks per listing request.", parse=integer(1, 1000), metavar="N"),
    )
    upload_batch: int = field(
        default=16,
        metadata=setting(
            "Tasks per upload request (a request also stops growing at about "
            f"{MAX_UPLOAD_BYTES / 1e6:g} MB).",
            parse=integer(1, 1000),
            metavar="N",
        ),
    )
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    decode_workers: int = field(
        default=4,
        metadata=setting(
            "Threads reading and decoding images ahead of the model.",
            parse=integer(1, 64),
            metavar="N",
        ),
    )
    timeout: float = field(
        default=60.0,
        metadata=setting(
            "Seconds for one request to Label Studio.", parse=number(minimum=1.0), metavar="S"
        ),
    )
    retries: int = field(
        default=5,
        metadata=setting(
            "Further attempts for a request that timed out or met a server error (5xx, 429).",
            parse=integer(0, 20),
            metavar="N",
        ),
    )
    failed_log: Path | None = field(
        default=None,
        metadata=setting(
            "JSON lines of the tasks that failed and why.",
            path="file",
            default_text="stableseg-failed-project-ID.jsonl in the current folder",
        ),
    )

    def __post_init__(self) -> None:
        for name in ("page_size", "upload_batch", "max_upload_bytes", "decode_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.timeout <= 0 or self.retries < 0:
            raise ValueError(
                f"timeout must be > 0 and retries >= 0, got {self.timeout} and {self.retries}"
            )


@dataclass(frozen=True)
class Task:
    """A task as listed: its id, data and the model versions of its predictions."""

    id: int
    data: dict[str, Any]
    versions: frozenset[str] = frozenset()


@dataclass
class Item:
    """One task out of the model: its prediction, or why it has none."""

    task: Task
    prediction: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class PredictSummary:
    """What a run did. ``exit_code``: 0 when every task has its prediction, 3 when some failed."""

    project: int
    model_version: str
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    upload_requests: int = 0
    seconds: float = 0.0
    failed_log: Path | None = None

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0


# ---------------------------------------------------------------------- connecting
def connect(url: str, api_key: str, timeout: float) -> LabelStudio:
    """A label-studio-sdk client (a personal access token is exchanged for access tokens)."""
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    try:
        return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout)
    except ApiError as err:  # an expired personal access token is refused here
        raise LabelStudioUsageError(f"LABEL_STUDIO_API_KEY: {_api_detail(err)}") from None
    except _UNREADABLE as err:  # the token exchange's answer
        raise _unreadable(err, url, "exchanging LABEL_STUDIO_API_KEY") from None


def project_target(
    client: LabelStudio, project: int, options: PredictOptions, max_labels: int
) -> BrushTarget:
    """The project's BrushLabels target, parsed exactly as the backend parses it."""
    found = _call(
        lambda: client.projects.get(id=project, request_options=_request(options)),
        options,
        f"reading project {project}",
    )
    config = getattr(found, "label_config", None)
    if not isinstance(config, str):
        raise LabelStudioUnavailable(
            f"reading project {project}: Label Studio at {options.url} answered without a "
            "labeling config"
        )
    try:
        return parse_label_config(config, max_labels)
    except LabelConfigError as err:
        raise LabelStudioUsageError(f"project {project}: {err}") from None


def backend_settings(options: PredictOptions) -> BackendSettings:
    """The backend's settings for this run: its environment, with ``--url``, the key and the
    model options of the command line (so images are read exactly as the backend reads them)."""
    return replace(
        BackendSettings.from_env(),
        stableseg=options.settings,
        label_studio_url=options.url.rstrip("/"),
        label_studio_api_key=options.api_key,
    )


# ---------------------------------------------------------------------- stages
def list_tasks(client: LabelStudio, options: PredictOptions, expected: int) -> Iterator[Task]:
    """Every task of the project, a page of ``page_size`` at a time, in id order.

    Pages are numbered: adding predictions does not move tasks between pages, since the order
    is by id. Each page is one small request, retried like every other. The listing is bounded:
    by the project's task count ``expected`` (the pages it fills, plus :data:`EXTRA_PAGES` for
    tasks added meanwhile) and by the ids, which must grow from page to page.

    Raises:
        LabelStudioUnavailable: the server pages past that bound, lists a task again, or
            answers with a listing that cannot be read.
    """
    last_page = -(-max(expected, 1) // options.page_size) + EXTRA_PAGES
    page = 1
    seen = 0
    last_id = 0
    while True:
        what = f"listing page {page} of project {options.project}'s tasks"
        if page > last_page:
            raise LabelStudioUnavailable(
                f"{what}: Label Studio at {options.url} still lists tasks past page "
                f"{last_page}, though the project had {expected} tasks ({options.page_size} a "
                "page); its listing does not end, so the run stops here (if tasks were being "
                "added, run the command again: it resumes)"
            )
        listing = _call(lambda page=page: _task_page(client, options, page), options, what)
        if listing is None:
            return
        tasks, total = _page_tasks(listing, options, what)
        for task in tasks:
            if task.id <= last_id:
                raise LabelStudioUnavailable(
                    f"{what}: Label Studio at {options.url} listed task {task.id} after task "
                    f"{last_id}; the listing is not in id order, so the run stops here"
                )
            last_id = task.id
            yield task
        seen += len(tasks)
        if not tasks or seen >= total:
            return
        page += 1


def _page_tasks(listing: Any, options: PredictOptions, what: str) -> tuple[list[Task], int]:
    """A listed page's tasks and the total it states, checked: a malformed answer is an error
    that says so, not an ``AttributeError`` deep in the run."""
    try:
        raw = listing.tasks or []
        if not isinstance(raw, list):
            raise TypeError(f"'tasks' is {type(raw).__name__}, not a list")
        total = int(listing.total or 0)
        tasks = []
        for task in raw:
            data = task.data or {}
            if not isinstance(data, dict):
                raise TypeError(f"task {task.id!r}'s data is {type(data).__name__}, not an object")
            tasks.append(Task(int(task.id), dict(data), _versions(task)))
    except (AttributeError, TypeError, ValueError) as err:
        raise LabelStudioUnavailable(
            f"{what}: Label Studio at {options.url} answered with a task listing this tool "
            f"cannot read ({err})"
        ) from None
    return tasks, total


def encode(
    items: Iterable[Segmented[Task]], target: BrushTarget, model_version: str
) -> Iterator[Item]:
    """Each segmented task with its Label Studio prediction (the backend's encoding)."""
    for item in items:
        if item.error is not None:
            yield Item(item.key, error=item.error)
        else:
            yield Item(item.key, build_prediction(item.result, target, model_version))


class Uploader:
    """Predictions to Label Studio in small import requests.

    A request holds at most ``upload_batch`` tasks and about ``max_upload_bytes`` of JSON.
    Timeouts, dropped connections and server errors are retried with growing waits; before a
    batch is sent again, the tasks it already stored are taken out of it (a request can fail
    on the client after the server stored it). A batch Label Studio refuses (4xx) is sent one
    prediction at a time, so one bad prediction fails alone, with Label Studio's reason.
    """

    def __init__(
        self,
        client: LabelStudio,
        options: PredictOptions,
        model_version: str,
        on_done: Callable[[int], None],
        on_failed: Callable[[Failure], None],
    ) -> None:
        self.client = client
        self.options = options
        self.model_version = model_version
        self.on_done = on_done
        self.on_failed = on_failed
        self.requests = 0
        self._batch: list[dict[str, Any]] = []
        self._bytes = 0

    def add(self, task_id: int, prediction: dict[str, Any]) -> None:
        """Queue one task's prediction; sends the batch when it is full."""
        body = {"task": task_id, **prediction}
        size = len(json.dumps(body))
        if self._batch and self._bytes + size > self.options.max_upload_bytes:
            self.flush()
        self._batch.append(body)
        self._bytes += size
        if len(self._batch) >= self.options.upload_batch:
            self.flush()

    def flush(self) -> None:
        """Send what is queued."""
        batch, self._batch, self._bytes = self._batch, [], 0
        if batch:
            self._send(batch)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        from label_studio_sdk.core.api_error import ApiError

        delay = 1.0
        for attempt in range(self.options.retries + 1):
            if attempt:
                stored = self._stored([body["task"] for body in batch])
                for task_id in stored:
                    self.on_done(task_id)
                batch = [body for body in batch if body["task"] not in stored]
                if not batch:
                    return
            try:
                self.requests += 1
                self.client.projects.import_predictions(
                    id=self.options.project,
                    request=batch,
                    request_options=_request(self.options),
                )
            except Exception as err:
                if _transient(err):
                    if attempt >= self.options.retries:
                        raise LabelStudioUnavailable(
                            f"uploading predictions to {self.options.url} failed "
                            f"{attempt + 1} times; last: {err}"
                        ) from None
                    log.warning("upload of %d predictions failed (%s); retrying", len(batch), err)
                    time.sleep(delay)
                    delay = min(2 * delay, MAX_BACKOFF_S)
                    continue
                if not isinstance(err, ApiError):
                    raise _failure(err, self.options, "uploading predictions") from None
                if err.status_code in (401, 403, 404):  # the key or the project, not the data
                    raise _failure(err, self.options, "uploading predictions") from None
                if batch[1:]:  # find the prediction Label Studio refuses
                    for body in batch:
                        self._send([body])
                    return
                self.on_failed(
                    Failure(batch[0]["task"], f"upload refused: {_api_detail(err)}", "task")
                )
                return
            for body in batch:
                self.on_done(body["task"])
            return

    def _stored(self, task_ids: list[int]) -> set[int]:
        """The tasks among ``task_ids`` that hold a prediction of this model version."""
        query = json.dumps({"selectedItems": {"all": False, "included": task_ids}})
        listing = _call(
            lambda: (
                self.client.tasks.list(
                    project=self.options.project,
                    page_size=len(task_ids),
                    include="id,predictions_model_versions",
                    query=query,
                    request_options=_request(self.options),
                ).response
            ),
            self.options,
            "checking which predictions were stored",
        )
        return {
            int(task.id) for task in listing.tasks or [] if self.model_version in _versions(task)
        }


# ---------------------------------------------------------------------- the run
def run_predict(
    options: PredictOptions, progress: Callable[[int, int], Any] | None = None
) -> PredictSummary:
    """Pre-annotate every task of the project that has no prediction of this model version.

    Raises:
        LabelStudioUsageError: a wrong URL, key, project or labeling config.
        LabelStudioUnavailable: Label Studio unreachable, or failing past the retries.
        ValueError: the model cannot be loaded (see ``labeler.jobs.models.load_stableseg``).
    """
    started = time.monotonic()
    settings = backend_settings(options)
    client = connect(options.url, options.api_key, options.timeout)
    target = project_target(client, options.project, options, settings.max_labels)
    total = _task_count(client, options)
    segmenter = cache.get_segmenter(settings)
    version = segmenter.model_version
    summary = PredictSummary(project=options.project, model_version=version, total=total)
    bar = progress(total, 0) if progress is not None else None
    log.info(
        "project %d: %d tasks, labels %s, model version %s",
        options.project,
        total,
        ", ".join(target.labels),
        version,
    )

    def done(_task_id: int) -> None:
        summary.done += 1
        _tick(bar)

    def failed(failure: Failure) -> None:
        log.warning("task %d gets no prediction: %s", failure.item, failure.reason)
        summary.failed.append(failure)
        _tick(bar)

    def unpredicted(tasks: Iterable[Task]) -> Iterator[Task]:
        for task in tasks:
            if version in task.versions:
                summary.skipped += 1
                _tick(bar)
            else:
                yield task

    uploader = Uploader(client, options, version, done, failed)
    tasks = unpredicted(list_tasks(client, options, total))
    segmented = segment_tasks(
        tasks,
        lambda task: ({"data": task.data}, task.id),
        target,
        ImageLoader(settings),
        segmenter,
        options.decode_workers,
    )
    try:
        for item in encode(segmented, target, version):
            if item.error is not None:
                failed(Failure(item.task.id, item.error, "task"))
            else:
                assert item.prediction is not None
                uploader.add(item.task.id, item.prediction)
        uploader.flush()
    finally:
        if bar is not None:
            bar.close()
        summary.upload_requests = uploader.requests
        summary.seconds = time.monotonic() - started
    summary.failed_log = _write_failures(options.failed_log, summary.failed)
    return summary


# ---------------------------------------------------------------------- helpers
def _task_page(client: LabelStudio, options: PredictOptions, page: int) -> Any:
    """One page of the listing (its ``tasks`` and ``total``); None past the last page."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        return client.tasks.list(
            project=options.project,
            page=page,
            page_size=options.page_size,
            include=TASK_FIELDS,
            resolve_uri=False,
            query=ORDER_BY_ID,
            request_options=_request(options),
        ).response
    except ApiError as err:
        if err.status_code == 404 and page > 1:  # "Invalid page": the project shrank
            return None
        raise


def _task_count(client: LabelStudio, options: PredictOptions) -> int:
    listing = _call(
        lambda: (
            client.tasks.list(
                project=options.project,
                page=1,
                page_size=1,
                include="id",
                request_options=_request(options),
            ).response
        ),
        options,
        f"counting project {options.project}'s tasks",
    )
    try:
        return int(listing.total or 0)
    except (AttributeError, TypeError, ValueError):
        raise LabelStudioUnavailable(
            f"counting project {options.project}'s tasks: Label Studio at {options.url} "
            f"answered with a total this tool cannot read ({getattr(listing, 'total', None)!r})"
        ) from None


def _versions(task: Any) -> frozenset[str]:
    """The model versions of a listed task's predictions (Label Studio joins them with ',')."""
    joined = getattr(task, "predictions_model_versions", None) or ""
    if isinstance(joined, list):
        return frozenset(str(v) for v in joined)
    return frozenset(v.strip() for v in str(joined).split(",") if v.strip())


def _request(options: PredictOptions) -> dict[str, Any]:
    """Per-request SDK options: our timeout; retries are ours (the SDK's are off: it would
    resend an upload after a server error, storing its predictions twice)."""
    return {"timeout_in_seconds": options.timeout, "max_retries": 0}


def _transient(err: BaseException) -> bool:
    """A timeout, a dropped connection, or a server-side error worth another try."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(err, ApiError):
        return err.status_code is not None and (
            err.status_code >= 500 or err.status_code in (408, 429)
        )
    return isinstance(err, (httpx.TimeoutException, httpx.TransportError))


def _call(call: Callable[[], T], options: PredictOptions, what: str) -> T:
    """``call()``, retried on transient failures; other failures as our errors."""
    delay = 1.0
    for attempt in range(options.retries + 1):
        try:
            return call()
        except Exception as err:
            if not _transient(err):
                raise _failure(err, options, what) from None
            if attempt >= options.retries:
                raise LabelStudioUnavailable(
                    f"{what} at {options.url} failed {attempt + 1} times; last: {err}"
                ) from None
            log.warning("%s failed (%s); retrying in %.0f s", what, err, delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)
    raise AssertionError("unreachable")


_UNREADABLE = (RecursionError, ValueError, TypeError)
"""What reading an answer raises when it is not the JSON expected: nested too deep for the
parser (``RecursionError``), not JSON at all or not of the expected shape."""


def _unreadable(err: BaseException, url: str, what: str) -> LabelStudioUnavailable:
    """The error for an answer that cannot be read (``err``: one of :data:`_UNREADABLE`)."""
    if isinstance(err, RecursionError):
        why = "JSON nested too deeply to read"
    else:
        why = f"an answer that is not the JSON expected ({str(err)[:200]})"
    return LabelStudioUnavailable(f"{what}: Label Studio at {url} answered with {why}")


def _failure(err: Exception, options: PredictOptions, what: str) -> Exception:
    """The error to raise for a failure that another try will not mend."""
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(err, _UNREADABLE):
        return _unreadable(err, options.url, what)
    if not isinstance(err, ApiError):
        return err
    if err.status_code is not None and 200 <= err.status_code < 300:  # the SDK: not JSON
        return LabelStudioUnavailable(
            f"{what}: Label Studio at {options.url} answered HTTP {err.status_code} with "
            f"something that is not JSON: {_api_detail(err)[:200]!r}"
        )
    if err.status_code in (401, 403):
        return LabelStudioUsageError(
            f"Label Studio at {options.url} refused LABEL_STUDIO_API_KEY ({what}: HTTP "
            f"{err.status_code} {_api_detail(err)}); use a personal access token from Account & "
            "Settings, or a legacy token where they are enabled"
        )
    if err.status_code == 404:
        return LabelStudioUsageError(
            f"{what}: Label Studio at {options.url} has no project {options.project} "
            f"(HTTP 404 {_api_detail(err)})"
        )
    return LabelStudioUnavailable(f"{what}: HTTP {err.status_code} {_api_detail(err)}")


def _api_detail(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("validation_errors") or body)[:500]
    return str(body or err)[:500]


def _tick(bar: Any) -> None:
    if bar is not None:
        bar.update(1)


def _write_failures(path: Path | None, failures: list[Failure]) -> Path | None:
    """The failures as JSON lines (an old file is emptied when nothing failed)."""
    if path is None or (not failures and not path.exists()):
        return None
    write_jsonl(path, [failure.to_dict() for failure in failures])
    return path
