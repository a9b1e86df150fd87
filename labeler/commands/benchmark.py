"""``stableseg benchmark``: StableSeg's mIoU on a dataset, by the paper's or the open protocol."""

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

DATASETS = (
    "voc",
    "voc21",
    "context59",
    "context60",
    "ade150",
    "cityscapes",
    "foodseg103",
    "uecfoodpix",
    "camvid",
    "folder",
)
"""``labeler.datasets.preset_names()``, listed here so ``--help`` imports no numpy (a test keeps
the two equal)."""


def _folder_options(
    dataset: str,
    labels: str | None,
    labels_file: Path | None,
    gt: Path | None,
    ignore_index: tuple[int, ...],
) -> tuple[tuple[str, ...] | None, Path | None]:
    """(labels, gt folder) of ``folder``; usage errors for folder options given elsewhere."""
    if dataset != "folder":
        given = [
            name
            for name, value in (
                ("--labels", labels),
                ("--labels-file", labels_file),
                ("--gt", gt),
                ("--ignore-index", ignore_index),
            )
            if value
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)}: only for the folder dataset; {dataset} ships its class "
                "names, ground truth and ignore rule"
            )
        return None, None
    if gt is None:
        raise click.UsageError("the folder dataset needs --gt (the ground-truth PNG folder)")
    return tuple(parse_labels(labels, labels_file)), gt


@click.command("benchmark")
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option(
    "--root",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The dataset's folder as released (or a folder above it); for folder, the images.",
)
@click.option("--split", help="A split of the dataset.  [default: the one papers report]")
@click.option(
    "--protocol",
    type=click.Choice(["paper", "open"]),
    default="paper",
    show_default=True,
    help="paper: each image prompted with the classes in its ground truth (the paper's "
    "section 5); open: every class of the dataset in every prompt.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Score the first N images only.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for benchmark.json, table.md and preview.png (overwritten).",
)
@click.option(
    "--background/--no-background",
    default=None,
    help="Score ground-truth background as a class (VOC-21, PC-60, the food datasets' own "
    "benchmark) or leave it unscored.  [default: the dataset's rule: unscored for the "
    "paper's datasets, scored for folder]",
)
@segmenter_options
@labels_options
@click.option(
    "--gt",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="folder only: ground-truth PNGs (<relative image path>.png, 0 background, k = k-th "
    "label, 255 ignore).",
)
@click.option(
    "--ignore-index",
    type=click.IntRange(0, 255),
    multiple=True,
    help="folder only: a ground-truth id that is not scored (repeatable; 255 always is).",
)
@click.option(
    "--sweep",
    multiple=True,
    help="Measure every combination: key=v1,v2 items (repeatable, or space-separated in one "
    "value). 'cross=<=16,<=32,<=64 self=<=16,<=32,<=64' prints Table 3's grid (the paper's "
    "cells: every side up to the value, 8 included; a value may also be one side, 8+16 a "
    "list, or all); timestep=1,50,100,200 Table 4's row; sar=on,off,self-only Table 2's; "
    "presence=off,1 flip=off,on timesteps=1,1+50+100 sar-rounds=1,2 compare the test-time "
    "additions (docs/benchmark.md); any other segmenter setting by its option's name, e.g. "
    "tiles=off,2,4.",
)
@click.option(
    "--preview",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Write preview.png: image | ground truth | prediction for the first N images.",
)
@click.option(
    "--save-masks",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write every predicted mask to DIR/<image key>.png in the dataset's own ids, as "
    "evaluation servers take them (Cityscapes labelIds, ADE20K 1..150 with 0 = other); with "
    "--sweep, one subfolder per point.",
)
@click.option(
    "--student",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Score a DeepLabV3+ trained by `refine` (W/plus/student or W/plusplus/student) "
    "instead of StableSeg, e.g. on the validation split (the paper's Table 5).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def benchmark(
    dataset: str,
    root: Path,
    split: str | None,
    protocol: str,
    limit: int | None,
    out: Path,
    background: bool | None,
    settings: ModelSettings,
    labels: str | None,
    labels_file: Path | None,
    gt: Path | None,
    ignore_index: tuple[int, ...],
    sweep: tuple[str, ...],
    preview: int,
    save_masks: Path | None,
    student: Path | None,
    verbose: bool,
) -> None:
    """Measure StableSeg on DATASET (a preset) found under --root.

    \b
    Presets: voc (PAS-20), voc21 (with background), context59, context60,
    ade150, cityscapes (19 trainIds), foodseg103, uecfoodpix, camvid, and
    folder (--root images, --gt masks, --labels or --labels-file).
    Scoring follows the dataset's protocol (ignored ids, background rule).

    \b
    Prints per-class IoU, mIoU, pixel accuracy and images/s, then Markdown:
    a row in the layout of the paper's Table 1, or with --sweep the grid
    of Tables 2-4. OUT/benchmark.json holds everything with the exact
    settings. The model loads once for the whole sweep.
    """
    setup_logging(verbose)
    folder_labels, gt_dir = _folder_options(dataset, labels, labels_file, gt, ignore_index)
    from labeler.jobs.benchmark import BenchmarkOptions, open_benchmark_dataset, run_benchmark
    from labeler.jobs.sweep import parse_sweep, sweep_points

    try:
        axes = tuple(parse_sweep(sweep))
        sweep_points(settings.segmenter, axes)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--sweep") from None
    try:
        options = BenchmarkOptions(
            dataset=dataset,
            root=root,
            out=out,
            settings=settings,
            split=split,
            protocol=protocol,
            limit=limit,
            background=background,
            labels=folder_labels,
            gt_dir=gt_dir,
            ignore_index=ignore_index,
            sweep=axes,
            preview=preview,
            save_masks=save_masks,
            student=student,
        )
        found = open_benchmark_dataset(options)  # layout errors before the model loads
    except (ValueError, KeyError) as err:
        raise click.UsageError(str(err).strip("'\"")) from None
    if student is None:
        check_model_source(settings.model.source)
    click.echo(
        f"{found.preset.title}, split {found.split}: {len(found.samples)} images"
        + (f", scoring the first {limit}" if limit else ""),
        err=True,
    )
    try:
        report = run_benchmark(options, bar=lambda total, desc: progress_bar(desc)(total, 0))
    except ValueError as err:
        raise click.ClickException(str(err)) from None

    for point in report["sweep"]["points"] if "sweep" in report else [report]:
        _echo_point(point)
    for note in report["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(report["table"], nl=False)
    click.echo(f"wrote {out / 'benchmark.json'} and {out / 'table.md'}", err=True)
    if report.get("preview"):
        click.echo(f"wrote {out / report['preview']}", err=True)
    if save_masks is not None:
        click.echo(f"wrote the predicted masks (the dataset's own ids) to {save_masks}", err=True)


def _echo_point(point: dict) -> None:
    """Per-class IoU and the summary line of one configuration, on stderr."""

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    title = " ".join(f"{k}={v}" for k, v in point["values"].items()) or point["method"]
    width = max(12, *(len(name) for name in point["per_class"]))
    lines = [f"== {title}"]
    lines += [f"  {name:<{width}} {show(iou):>6}" for name, iou in point["per_class"].items()]
    speed = point["images_per_second"]
    lines.append(
        f"  mIoU {show(point['mIoU'])}  pixel accuracy {show(point['pixel_accuracy'])}  "
        f"{point['images']} images ({len(point['skipped'])} skipped)  "
        f"{'-' if speed is None else f'{speed:.2f}'} images/s"
    )
    click.echo("\n".join(lines), err=True)
