"""``stableseg label-studio``: work on a Label Studio project through its API.

``predict`` pre-annotates a whole project from the command line (see
:mod:`ml_backend.project`). Only click and the declaration of its options are imported at module
level (no torch).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import click

from ml_backend.project import PredictOptions

from .common import check_model_source, progress_bar, settings_options, setup_logging


@click.group("label-studio", context_settings={"help_option_names": ["-h", "--help"]})
def label_studio() -> None:
    """Work on a Label Studio project through its API (token from LABEL_STUDIO_API_KEY)."""


@label_studio.command("predict")
@settings_options(PredictOptions, "options", environment=True)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def predict(
    options: PredictOptions,
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
    from ml_backend.project import LabelStudioUnavailable, LabelStudioUsageError, run_predict

    setup_logging(verbose)
    for noisy in ("httpx", "httpcore"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    check_model_source(options.settings.model.source)
    if options.failed_log is None:
        failed_log = Path(f"stableseg-failed-project-{options.project}.jsonl")
        options = replace(options, failed_log=failed_log)
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
