"""``cli.py evaluate``: mIoU of predicted masks against ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from .common import labels_options, parse_labels


@click.command("evaluate")
@click.argument("pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@labels_options
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the figures as JSON: mIoU, per_class, pixel_accuracy (percent).",
)
@click.option(
    "--exclude-background",
    is_flag=True,
    help="Leave background (0) out of the mean, as the paper's VOC-20 protocol does.",
)
def evaluate(
    pred_dir: Path,
    gt_dir: Path,
    labels: str | None,
    labels_file: Path | None,
    json_path: Path | None,
    exclude_background: bool,
) -> None:
    """Score predicted masks in PRED_DIR against ground-truth masks in GT_DIR.

    \b
    Both folders hold indexed PNG masks (0 = background, k = k-th label,
    255 = ignore, ignored in either mask), matched by relative path without
    extension. PRED_DIR may be a pseudo-label output folder (its masks/ is
    used). Missing predictions and size mismatches are reported and skipped.

    \b
    mIoU is the standard confusion-matrix definition, accumulated over all
    images, averaged over the classes present in ground truth or prediction.
    For the paper's prompt protocol (each image prompted with only the labels
    in its ground truth), label with `pseudo-label --labels-from-gt GT_DIR`.
    """
    from labeler.jobs.evaluate import evaluate_folders, format_table
    from labeler.jobs.io import atomic_write_json

    names = parse_labels(labels, labels_file)
    try:
        result = evaluate_folders(
            pred_dir, gt_dir, names, include_background=not exclude_background
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_table(result))
    for skip in result.skipped:
        click.echo(f"skipped {skip.path}: {skip.reason}", err=True)
    if json_path is not None:
        atomic_write_json(json_path, result.to_dict(), indent=2)
        click.echo(f"wrote {json_path}", err=True)
