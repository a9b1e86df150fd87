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
    help="Also write the figures as JSON: mIoU, per_class, pixel_accuracy, mean_accuracy "
    "(percent), num_pixels, images, abstained_pixels, protocol, images_evaluated, skipped.",
)
@click.option(
    "--ignore-index",
    "ignore_index",
    type=click.IntRange(min=0),
    multiple=True,
    help="A ground-truth id that is not scored (repeatable). 255 is always ignored; "
    "this adds more (a second void id, say). For a 0 that is not a class (unlabelled, or "
    "background the protocol leaves out) use --exclude-background, which also keeps class 0 "
    "out of the mean.",
)
@click.option(
    "--exclude-background",
    is_flag=True,
    help="Do not score ground-truth background (0) pixels, and leave class 0 out of the "
    "means: the PAS-20 / PC-59 / A-150 protocols. [default: background is class 0]",
)
@click.option(
    "--pred-ignore",
    type=click.Choice(["skip", "miss"]),
    default="skip",
    show_default=True,
    help="A scored pixel whose prediction is an ignore id (255, e.g. a pseudo-mask's "
    "uncertain pixels): skip leaves it out; miss counts it as a false negative of its "
    "ground-truth class (mmsegmentation's rule).",
)
def evaluate(
    pred_dir: Path,
    gt_dir: Path,
    labels: str | None,
    labels_file: Path | None,
    json_path: Path | None,
    ignore_index: tuple[int, ...],
    exclude_background: bool,
    pred_ignore: str,
) -> None:
    """Score predicted masks in PRED_DIR against ground-truth masks in GT_DIR.

    \b
    Both folders hold indexed PNG masks (0 = background, k = k-th label,
    255 = ignore), matched by relative path without extension. PRED_DIR may
    be a pseudo-label output folder (its masks/ is used). Missing
    predictions, size mismatches and masks holding ids that are neither a
    label nor ignored are reported and skipped.

    \b
    The protocol (decided by the ground truth alone):
    - a ground-truth pixel is not scored when its id is 255 or an
      --ignore-index, or, with --exclude-background, when it is 0;
    - a scored pixel predicted as background (0) or as another label is a
      false negative of its own class and a false positive of the predicted
      one; a prediction of 255 (or of another ignored id that is not a
      label) follows --pred-ignore;
    - one confusion matrix is summed over all images; IoU = TP / (TP + FP +
      FN) per class; mIoU is the mean over the classes present in the
      ground truth or the predictions, without class 0 under
      --exclude-background (its IoU is still listed).
    Toy check: ground truth half background, half cat, everything predicted
    cat: mIoU 25.0 by default (background 0, cat 50); 100.0 with
    --exclude-background (the background pixels are not scored).

    \b
    For the paper's prompt protocol (each image prompted with only the labels
    in its ground truth), label with `pseudo-label --labels-from-gt GT_DIR`.
    """
    from labeler.jobs.evaluate import evaluate_folders, format_table
    from labeler.jobs.io import atomic_write_json
    from labeler.metrics import ScoreProtocol

    names = parse_labels(labels, labels_file)
    protocol = ScoreProtocol(
        ignore_index=ignore_index, exclude_background=exclude_background, pred_ignore=pred_ignore
    )
    try:
        result = evaluate_folders(pred_dir, gt_dir, names, protocol)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_table(result))
    for skip in result.skipped:
        click.echo(f"skipped {skip.item}: {skip.reason}", err=True)
    if json_path is not None:
        atomic_write_json(json_path, result.to_dict(), indent=2)
        click.echo(f"wrote {json_path}", err=True)
