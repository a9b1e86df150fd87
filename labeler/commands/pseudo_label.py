"""``cli.py pseudo-label``: label a folder of images with StableSeg."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from labeler.jobs.pseudo_label_options import PseudoLabelOptions
from labeler.model_settings import ModelSettings

from .common import (
    Location,
    check_model_source,
    labels_options,
    parse_labels,
    progress_bar,
    segmenter_options,
    settings_options,
    setup_logging,
)


@click.command("pseudo-label")
@click.argument("images_dir", type=Location())
@labels_options
@settings_options(PseudoLabelOptions, "choices", build=False)
@segmenter_options
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def pseudo_label(
    images_dir: Any,
    labels: str | None,
    labels_file: Path | None,
    choices: dict[str, Any],
    settings: ModelSettings,
    verbose: bool,
) -> None:
    """Label every image under IMAGES_DIR (recursively) with the given labels.

    IMAGES_DIR and --out may be object storage URLs (s3://bucket/prefix,
    gs://..., az://...; https://... for IMAGES_DIR): see docs/storage.md.

    \b
    Inputs: jpg, jpeg, png, bmp, webp, tif, tiff; EXIF orientation is applied.
    Outputs in --out:
      masks/<path>.png    indexed PNG, 0 = background, k = k-th label, 255 = ignore
      coco.json           COCO with compressed RLE, category k = k-th label
      labelstudio.json    Label Studio import file with brush predictions
      labelmap.txt, classes.json, skipped.jsonl (unreadable files and why)
      preview/            overlays and index.html (--preview)

    \b
    The run resumes: rerun the same command after an interruption and only
    missing images are labelled; exports are rebuilt. Under torchrun or
    accelerate launch the images are split across the processes; with
    --engine ray, across the actors of a Ray cluster.

    \b
    Exit status: 0 every image labelled, 3 some images skipped (see
    skipped.jsonl), 2 usage error, 1 other error.
    """
    from labeler.jobs.extras import MissingExtraError
    from labeler.jobs.pseudo_label import NoImagesError, RunMismatchError, run
    from labeler.settings import build

    setup_logging(verbose)
    names = parse_labels(labels, labels_file)
    options = build(
        PseudoLabelOptions,
        choices,
        images_dir=images_dir,
        labels=names,
        model=settings.model,
        segmenter=settings.segmenter,
    )
    options = replace(options, formats=tuple(dict.fromkeys((*options.formats, "png"))))
    if settings.weights is not None and options.student is not None:
        raise click.UsageError(
            "--weights applies to StableSeg; it cannot be combined with --student"
        )
    if options.student is None:
        check_model_source(settings.model.source)
    try:
        summary = run(options, progress=progress_bar("pseudo-label"))
    except NoImagesError as err:
        raise click.BadParameter(str(err), param_hint="IMAGES_DIR") from None
    except RunMismatchError as err:
        raise click.UsageError(str(err)) from None
    except (ValueError, OSError, MissingExtraError) as err:
        raise click.ClickException(str(err)) from None
    if summary.outputs:
        click.echo(
            f"labelled {summary.labelled}, skipped {len(summary.skipped)}, "
            f"already done {summary.already_done} (of {summary.total}) in {summary.seconds:.1f}s",
            err=True,
        )
        for name, path in summary.outputs.items():
            click.echo(f"  {name:12s} {path}", err=True)
        if summary.skipped:
            click.echo(
                f"  {len(summary.skipped)} skipped: see {summary.outputs['skipped']}", err=True
            )
    raise SystemExit(summary.exit_code)
