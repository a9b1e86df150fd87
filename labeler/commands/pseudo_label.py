"""``cli.py pseudo-label``: label a folder of images with StableSeg."""

from __future__ import annotations

from pathlib import Path

import click

from labeler.model_settings import ModelSettings

from .common import (
    check_model_source,
    labels_options,
    parse_labels,
    progress_bar,
    segmenter_options,
    setup_logging,
)


@click.command("pseudo-label")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@labels_options
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (created). Rerunning into it resumes the run.",
)
@segmenter_options
@click.option(
    "--crf/--no-crf",
    default=False,
    show_default=True,
    help="Refine the probabilities with DenseCRF (pydensecrf2) before the argmax.",
)
@click.option(
    "--format",
    "formats",
    multiple=True,
    default=("coco", "png"),
    show_default=True,
    type=click.Choice(["coco", "png", "labelstudio"]),
    help="Exports to write (repeatable). PNG masks are always written: they are the "
    "per-image record that resuming relies on.",
)
@click.option(
    "--student",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Label with a DeepLabV3+ trained by `refine` (e.g. W/plusplus/student) "
    "instead of StableSeg.",
)
@click.option(
    "--preview",
    is_flag=True,
    help="Write overlays to OUT/preview/ and a gallery OUT/preview/index.html.",
)
@click.option(
    "--image-root-url",
    default=None,
    help="How Label Studio reaches IMAGES_DIR, joined with each relative path in "
    "labelstudio.json.  [default: /data/local-files/?d=<IMAGES_DIR name>]",
)
@click.option(
    "--max-pixels",
    default=100_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images with more pixels are skipped (listed in skipped.jsonl).",
)
@click.option(
    "--labels-from-gt",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Ground-truth mask folder: prompt each image with only the labels present "
    "in its ground truth (the paper's evaluation protocol). Mask ids stay global.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads that read images, and threads that write outputs (each pool); the model "
    "runs on the main thread.  [default: the CPUs this process may use, at most 16]",
)
@click.option("--overwrite", is_flag=True, help="Discard a previous run in --out and start again.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def pseudo_label(
    images_dir: Path,
    labels: str | None,
    labels_file: Path | None,
    out_dir: Path,
    settings: ModelSettings,
    crf: bool,
    formats: tuple[str, ...],
    student: Path | None,
    preview: bool,
    image_root_url: str | None,
    max_pixels: int,
    labels_from_gt: Path | None,
    workers: int | None,
    overwrite: bool,
    verbose: bool,
) -> None:
    """Label every image under IMAGES_DIR (recursively) with the given labels.

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
    accelerate launch the images are split across the processes.

    \b
    Exit status: 0 every image labelled, 3 some images skipped (see
    skipped.jsonl), 2 usage error, 1 other error.
    """
    from labeler.jobs.pseudo_label import NoImagesError, PseudoLabelOptions, RunMismatchError, run

    setup_logging(verbose)
    names = parse_labels(labels, labels_file)
    formats = tuple(dict.fromkeys((*formats, "png")))
    if settings.weights is not None and student is not None:
        raise click.UsageError(
            "--weights applies to StableSeg; it cannot be combined with --student"
        )
    if student is None:
        check_model_source(settings.model.source)
    options = PseudoLabelOptions(
        images_dir=images_dir,
        out_dir=out_dir,
        labels=names,
        model=settings.model,
        segmenter=settings.segmenter,
        crf=crf,
        formats=formats,
        student=student,
        preview=preview,
        image_root_url=image_root_url,
        max_pixels=max_pixels,
        labels_from_gt=labels_from_gt,
        overwrite=overwrite,
        workers=workers,
    )
    try:
        summary = run(options, progress=progress_bar("pseudo-label"))
    except NoImagesError as err:
        raise click.BadParameter(str(err), param_hint="IMAGES_DIR") from None
    except RunMismatchError as err:
        raise click.UsageError(str(err)) from None
    except (ValueError, OSError) as err:
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
