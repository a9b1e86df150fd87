"""``stableseg label-studio``: work on a Label Studio project through its API.

``predict`` pre-annotates a whole project from the command line (see
:mod:`ml_backend.project`). Only click is imported at module level.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from labeler.model_settings import ModelSettings

from .common import check_model_source, progress_bar, segmenter_options, setup_logging

API_KEY_VARIABLE = "LABEL_STUDIO_API_KEY"


@click.group("label-studio", context_settings={"help_option_names": ["-h", "--help"]})
def label_studio() -> None:
    """Work on a Label Studio project through its API (token from LABEL_STUDIO_API_KEY)."""


@label_studio.command("predict", context_settings={"show_default": True})
@click.option(
    "--url",
    envvar="LABEL_STUDIO_URL",
    required=True,
    help="Label Studio's address, as its task URLs name it (also LABEL_STUDIO_URL).",
)
@click.option("--project", type=click.IntRange(min=1), required=True, help="The project's id.")
@segmenter_options(environment=True)
@click.option(
    "--page-size", type=click.IntRange(1, 1000), default=100, help="Tasks per listing request."
)
@click.option(
    "--upload-batch",
    type=click.IntRange(1, 1000),
    default=16,
    help="Tasks per upload request (a request also stops growing at about 8 MB).",
)
@click.option(
    "--decode-workers",
    type=click.IntRange(1, 64),
    default=4,
    help="Threads reading and decoding images ahead of the model.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    help="Seconds for one request to Label Studio.",
)
@click.option(
    "--retries",
    type=click.IntRange(0, 20),
    default=5,
    help="Further attempts for a request that timed out or met a server error (5xx, 429).",
)
@click.option(
    "--failed-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON lines of the tasks that failed and why.  "
    "[default: stableseg-failed-project-ID.jsonl in the current folder]",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def predict(
    url: str,
    project: int,
    settings: ModelSettings,
    page_size: int,
    upload_batch: int,
    decode_workers: int,
    timeout: float,
    retries: int,
    failed_log: Path | None,
    verbose: bool,
) -> None:
    """Pre-annotate every task of a Label Studio project with StableSeg brush masks.

    \b
    The labels come from the project's labeling config and the images are read
    exactly as the ML backend (`serve`) reads them: LOCAL_FILES_DOCUMENT_ROOT
    for local files when set, else through --url with LABEL_STUDIO_API_KEY (a
    personal access token or a legacy token; never a command-line option, which
    other users could read). Tasks are listed page by page, labelled in batches of
    --batch-size and uploaded a few at a time, so no request can time out.

    \b
    The predictions equal the backend's for the same settings, model version
    included; every model option also reads its STABLESEG_* variable, as `serve`
    does, so one environment configures both. Resumable: tasks that already hold
    a prediction of this model version are skipped, so a rerun finishes an
    interrupted run.

    \b
    Exit status: 0 every task has its prediction, 3 some tasks failed (see
    --failed-log), 2 usage error, 1 Label Studio unreachable or failing.
    """
    from ml_backend.project import (
        LabelStudioUnavailable,
        LabelStudioUsageError,
        PredictOptions,
        run_predict,
    )

    setup_logging(verbose)
    for noisy in ("httpx", "httpcore"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    api_key = os.environ.get(API_KEY_VARIABLE, "").strip()
    if not api_key:
        raise click.UsageError(
            f"set {API_KEY_VARIABLE} to a Label Studio personal access token (Account & "
            "Settings > Personal Access Token) or a legacy token"
        )
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--url")
    check_model_source(settings.model.source)
    options = PredictOptions(
        url=url,
        project=project,
        api_key=api_key,
        settings=settings,
        page_size=page_size,
        upload_batch=upload_batch,
        decode_workers=decode_workers,
        timeout=timeout,
        retries=retries,
        failed_log=failed_log or Path(f"stableseg-failed-project-{project}.jsonl"),
    )
    try:
        summary = run_predict(options, progress=progress_bar("label-studio predict", "task"))
    except LabelStudioUsageError as err:
        raise click.UsageError(str(err)) from None
    except (LabelStudioUnavailable, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(
        f"project {summary.project}: predicted {summary.done}, skipped {summary.skipped} "
        f"(already predicted by {summary.model_version}), failed {len(summary.failed)} "
        f"(of {summary.total}) in {summary.seconds:.1f}s, {summary.upload_requests} upload "
        "requests",
        err=True,
    )
    if summary.failed:
        click.echo(f"  failed tasks and why: {summary.failed_log}", err=True)
    raise SystemExit(summary.exit_code)
