"""``cli.py refine``: StableSeg+ / StableSeg++ self-training on an unlabelled pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from labeler.jobs.refine_options import RefineOptions
from labeler.model_settings import ModelSettings

from .common import (
    Location,
    check_model_source,
    labels_options,
    parse_labels,
    segmenter_options,
    settings_options,
    setup_logging,
)


@click.command("refine")
@click.argument("images_dir", type=Location())
@labels_options
@click.option(
    "--work-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the cache, checkpoints, students, weights and report (created). "
    "Rerunning the same command resumes from the last finished step.",
)
@segmenter_options
@settings_options(RefineOptions, "choices", build=False)
@click.option(
    "--labels-from-gt",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Prompt each image with the labels present in its ground-truth mask "
    "DIR/<relative path without extension>.png (0 background, k = k-th label, 255 ignore), "
    "as the paper's Table 5 does; ids stay those of --labels. Images without a mask, or "
    "with no label in it, are skipped and listed in the report.",
)
@click.option(
    "--image-labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='Per-image labels from a JSON-lines file: {"image": "<path relative to '
    'IMAGES_DIR>", "labels": ["cat", ...]} per line, names from --labels. Images not '
    "listed are skipped.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def refine(
    images_dir: Any,
    labels: str | None,
    labels_file: Path | None,
    work_dir: Path,
    settings: ModelSettings,
    choices: dict[str, Any],
    labels_from_gt: Path | None,
    image_labels: Path | None,
    verbose: bool,
) -> None:
    """Improve the pseudo-labels of IMAGES_DIR without any human annotation.

    IMAGES_DIR may be an object storage URL (s3://bucket/prefix, gs://..., az://...,
    https://...; see docs/storage.md); the work dir stays on this machine.

    \b
    1. StableSeg pseudo-masks for every image, and a cache of every
       attention layer's class map (W/cache, fp16).
    2. plus: DenseCRF cleans the pseudo-masks, uncertain pixels are ignored,
       a DeepLabV3+ trains on them and predicts the pool (W/plus/student).
    3. plusplus: one weight per attention map is fitted so StableSeg matches
       those predictions (W/plusplus/weights.safetensors, for
       `pseudo-label --weights`); new pseudo-masks from the cache, CRF, and
       a new DeepLabV3+ (W/plusplus/student, for `pseudo-label --student`).
    W/report.json and W/report.png: times, loss curves, weights, mIoU.

    \b
    --labels-from-gt DIR or --image-labels FILE prompt each image with its
    own labels (the paper's per-image setting); the masks, the cache, the
    weight fit and the scores keep the ids of --labels.

    \b
    Rerunning the same command resumes; a finished run returns at once.
    Several GPUs: accelerate launch cli.py refine ... (or torchrun).
    """
    names = parse_labels(labels, labels_file)
    if labels_from_gt is not None and image_labels is not None:
        raise click.UsageError("give at most one of --labels-from-gt and --image-labels")
    setup_logging(verbose)
    from labeler.jobs.refine import RefineMismatchError, run_refine
    from labeler.jobs.refine.files import labels_from_gt as gt_labels
    from labeler.jobs.refine.files import labels_from_jsonl, pool_from_folder
    from labeler.settings import build
    from labeler.train.model import EncoderWeightsUnavailable

    check_model_source(settings.model.source)
    try:
        pool = pool_from_folder(images_dir)
        per_image = None
        if labels_from_gt is not None:
            per_image = gt_labels(pool, labels_from_gt, names)
        elif image_labels is not None:
            per_image = labels_from_jsonl(pool, images_dir, image_labels, names)
        options = build(
            RefineOptions,
            choices,
            labels=tuple(names),
            model=settings.model,
            segmenter=settings.segmenter,
            image_labels=per_image,
        )
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    try:
        result = run_refine(pool, work_dir, options)
    except RefineMismatchError as err:
        raise click.UsageError(str(err)) from None
    except (ValueError, OSError, ImportError, EncoderWeightsUnavailable) as err:
        raise click.ClickException(str(err)) from None

    report = result.report
    if not result.is_main:  # another process of torchrun / accelerate launch
        return
    state = "already finished" if result.already_done else "finished"
    click.echo(f"refine {state}: {result.work_dir}", err=True)
    for stage, entry in report["stages"].items():
        miou = entry.get("mIoU")
        score = f"mIoU {miou:.1f}" if miou is not None else "mIoU -"
        seconds = entry.get("seconds")
        took = f"{seconds:.1f}s" if seconds is not None else "-"
        click.echo(f"  {stage:10s} {score:12s} {took:>9s}", err=True)
    pseudo = (report["stages"].get("plusplus") or {}).get("pseudo") or {}
    differ = pseudo.get("cache_disagreement")
    if differ is not None:
        click.echo(
            f"  plusplus masks exact; the cache shortcut differs on {differ['differing_pixels']} "
            f"of {differ['pixels']} pixels ({100 * differ['fraction']:.2f}%, "
            f"{differ['images_differing']} images)",
            err=True,
        )
    click.echo(f"  report     {result.work_dir / 'report.json'}", err=True)
    for stage, folder in result.students.items():
        click.echo(f"  {stage + ' student':18s} {folder}", err=True)
    if result.weights_path is not None:
        click.echo(f"  map weights        {result.weights_path}", err=True)
