"""What one request may ask of the backend, and the JSON error that says it asked too much.

Every limit is checked before the work it bounds starts, and a request past one gets a 4xx JSON
error (``{"status": ..., "detail": ...}``, label-studio-ml's shape) whose detail names the limit
and the environment variable that sets it (their defaults: :class:`BackendSettings`, listed in
``docs/settings.md``):

=========================  ================================================================
variable                   what it bounds
=========================  ================================================================
STABLESEG_MAX_BODY_BYTES   a request body (413), checked before anything reads it
                           (:mod:`ml_backend.guard`), after basic auth
STABLESEG_MAX_LABELS       labels of a project's BrushLabels (400 at ``/setup`` and
                           ``/predict``); may only lower what a mask holds
STABLESEG_MAX_TASKS        tasks of one ``/predict`` (413)
STABLESEG_REQUEST_TIMEOUT  sending a request's head (:mod:`ml_backend.worker`), then its body
                           (408, :mod:`ml_backend.guard`)
STABLESEG_DOWNLOAD_BUDGET  the image downloads of one ``/predict`` together
                           (:class:`ml_backend.fetch.DownloadBudget`); a task whose image it
                           cuts off gets no prediction and an error that names it
STABLESEG_MAX_DOWNLOADS    downloads a worker process runs at once, all requests together
=========================  ================================================================

Why a spent download budget fails the tasks it cut off rather than the whole request: the tasks
whose images did arrive are predicted and stored, as with any task whose image cannot be read
(``errors`` of the answer, one :class:`labeler.jobs.io.Failure` each), and Label Studio can ask
for the rest again; answering 4xx would throw away the work already done while the threads were
held just the same. The request ends when the budget is spent, whatever its servers do.

Why 32 tasks by default: Label Studio gives a ``/predict`` ``ML_TIMEOUT_PREDICT`` = 100 s. A
task costs about 2 s on a modest GPU in the worst common case (the paper's 1-2 s an image for the
UNet and VAE passes, plus downloading a full-size photo and encoding its brush masks), so 32
tasks take about 64 s and leave a third of the timeout for a request that waits behind another
one for the GPU. Larger selections are what ``stableseg label-studio predict`` is for: it
pre-annotates a whole project from the command line, in pieces, with no timeout.

A body must be a JSON object; its fields are checked for their types, and JSON nested too deeply
for the parser gives a 400 like any other malformed body.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from labeler.images import ImageError

from .backend_settings import BackendSettings

if TYPE_CHECKING:
    from flask import Response

PREDICT_CLI = "stableseg label-studio predict"

REQUEST_LIMITS = (
    "max_body_bytes",
    "request_timeout",
    "max_tasks",
    "max_labels",
    "download_budget",
    "max_downloads",
    "http_timeout",
    "max_image_bytes",
    "max_pixels",
)
"""The :class:`BackendSettings` that bound a request, as ``docs/security.md`` lists them
(generated: ``python -m labeler.commands.settings_table --write docs/security.md``)."""


class RequestError(Exception):
    """A request the backend refuses: the HTTP status and the message for the caller."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def response(self, **headers: str) -> Response:
        return json_error(self.status, self.detail, **headers)


def json_error(status: int, detail: str, **headers: str) -> Response:
    """A JSON error response in label-studio-ml's shape: ``{"status": ..., "detail": ...}``."""
    from flask import Response  # here: ml_backend.images, which the CLI uses, imports this module

    body = json.dumps({"status": status, "detail": detail}) + "\n"
    response = Response(body, status=status, mimetype="application/json")
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def body_too_large(size: int | None, settings: BackendSettings) -> RequestError:
    """413 for a body over STABLESEG_MAX_BODY_BYTES (``size`` None: it did not say its size)."""
    told = f"{size} bytes" if size is not None else "more than that"
    return RequestError(
        413,
        f"the request body is {told}; this backend takes at most {settings.max_body_bytes} "
        "bytes (STABLESEG_MAX_BODY_BYTES). A /predict body holds task JSON, not images.",
    )


def body_too_slow(settings: BackendSettings) -> RequestError:
    """408 for a body that did not arrive within STABLESEG_REQUEST_TIMEOUT."""
    return RequestError(
        408,
        f"the request body did not arrive within {settings.request_timeout:g} s "
        "(STABLESEG_REQUEST_TIMEOUT)",
    )


def json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError(
            400, "the request body must be a JSON object; this one is nested too deeply"
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(
            400, f"the request body must be a JSON object; it is not JSON ({err})"
        ) from None
    if not isinstance(body, dict):
        raise RequestError(
            400, f"the request body must be a JSON object, got a JSON {type(body).__name__}"
        )
    return body


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool) -> Any:
    """``body[name]`` if it has the expected JSON type (None when absent and not required)."""
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        got = "nothing" if value is None else f"a {type(value).__name__}"
        raise RequestError(400, f"{name!r} must be a {names}, got {got}")
    return value


def check_tasks(tasks: list[Any], settings: BackendSettings) -> None:
    """413 for a /predict with more than STABLESEG_MAX_TASKS tasks."""
    if len(tasks) > settings.max_tasks:
        raise RequestError(
            413,
            f"{len(tasks)} tasks in one /predict; this backend takes at most "
            f"{settings.max_tasks} (STABLESEG_MAX_TASKS), what fits Label Studio's 100 s "
            f"prediction timeout. Select fewer tasks, or pre-annotate the whole project with "
            f"`{PREDICT_CLI}`.",
        )


class DownloadBudgetSpent(ImageError):
    """A task whose image download was cut off, or never started, because the downloads of its
    request had used up STABLESEG_DOWNLOAD_BUDGET (a per-task failure: see the module)."""


def download_budget_spent(settings: BackendSettings, waiting: bool) -> DownloadBudgetSpent:
    """The failure of a task whose download the request's budget cut off (``waiting``: it had
    waited for one of the process's STABLESEG_MAX_DOWNLOADS slots)."""
    slots = (
        f", after waiting for one of the {settings.max_downloads} download slots that other "
        "downloads held (STABLESEG_MAX_DOWNLOADS)"
        if waiting
        else ""
    )
    return DownloadBudgetSpent(
        f"the image downloads of this request used up their budget of "
        f"{settings.download_budget:g} s (STABLESEG_DOWNLOAD_BUDGET) before this task's image "
        f"arrived{slots}; predict the task again, or ask for fewer tasks at once"
    )
