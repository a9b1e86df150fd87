"""``cli.py refine``: StableSeg+ / StableSeg++ self-training on an unlabelled pool."""

from __future__ import annotations

from pathlib import Path

import click

from labeler.model_settings import ModelSettings

from .common import (
    check_model_source,
    labels_options,
    parse_labels,
    segmenter_options,
    setup_logging,
)


def _stages(value: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in value.split(",") if s.strip())
    valid = ("stableseg", "plus", "plusplus")
    bad = [s for s in names if s not in valid]
    if bad or not names:
        raise click.BadParameter(
            f"unknown stage(s) {bad or value!r}; give a comma-separated subset of "
            f"{', '.join(valid)}",
            param_hint="--stages",
        )
    return names


@click.command("refine")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@labels_options
@click.option(
    "--work-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the cache, checkpoints, students, weights and report (created). "
    "Rerunning the same command resumes from the last finished step.",
)
@segmenter_options
@click.option(
    "--stages",
    default="stableseg,plus,plusplus",
    show_default=True,
    help="Stages to run: stableseg (pseudo-masks and attention cache; always runs first), "
    "plus (CRF + DeepLabV3+), plusplus (learned map weights + DeepLabV3+ again).",
)
@click.option("--crf/--no-crf", default=True, show_default=True, help="DenseCRF on pseudo-masks.")
@click.option(
    "--uncertain-threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Pseudo-mask pixels whose best (CRF) probability is below this are ignored (255) "
    "in training.  [default: 0.6 with --crf, none without]",
)
@click.option("--encoder", default="resnet50", show_default=True, help="smp encoder name.")
@click.option(
    "--encoder-weights",
    type=click.Choice(["imagenet", "none"]),
    default="imagenet",
    show_default=True,
    help="Encoder initialisation (imagenet is downloaded from the Hugging Face hub).",
)
@click.option(
    "--epochs",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Passes over the pool for each student.",
)
@click.option(
    "--train-batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=2),
    help="Student training images per step (per process under torchrun / accelerate launch).",
)
@click.option(
    "--lr",
    default=0.01,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Base learning rate (SGD, momentum 0.9, poly decay).",
)
@click.option(
    "--crop-size",
    default=512,
    show_default=True,
    type=click.IntRange(min=32),
    help="Student training crop side (a multiple of 32); at inference the longer side is "
    "resized to it.",
)
@click.option(
    "--max-side",
    default=1024,
    show_default=True,
    type=click.IntRange(min=32),
    help="Larger images are downscaled to this longer side for CRF and training.",
)
@click.option(
    "--map-steps",
    default=300,
    show_default=True,
    type=click.IntRange(min=1),
    help="Optimisation steps of the StableSeg++ weight fit.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Student init, sampling, weight fit."
)
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="DataLoader worker processes for training.",
)
@click.option(
    "--val-gt",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Ground-truth masks (<relative path>.png, 0 background, k = k-th label, 255 ignore) "
    "to report mIoU after each stage; never used for training. Given to a rerun of a "
    "finished run, it scores that run without training anything again.",
)
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
@click.option(
    "--plusplus-masks",
    type=click.Choice(["exact", "cache"]),
    default="exact",
    show_default=True,
    help="StableSeg++ pseudo-masks: exact runs StableSeg with the learned weights (one more "
    "UNet pass per image); cache rebuilds them from the stage-1 cache (no UNet, but SAR keeps "
    "the uniform weights' seed). The report counts the pixels the two disagree on (exact).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def refine(
    images_dir: Path,
    labels: str | None,
    labels_file: Path | None,
    work_dir: Path,
    settings: ModelSettings,
    stages: str,
    crf: bool,
    uncertain_threshold: float | None,
    encoder: str,
    encoder_weights: str,
    epochs: int,
    train_batch_size: int,
    lr: float,
    crop_size: int,
    max_side: int,
    map_steps: int,
    seed: int,
    workers: int,
    val_gt: Path | None,
    labels_from_gt: Path | None,
    image_labels: Path | None,
    plusplus_masks: str,
    verbose: bool,
) -> None:
    """Improve the pseudo-labels of IMAGES_DIR without any human annotation.

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
    chosen = _stages(stages)
    if labels_from_gt is not None and image_labels is not None:
        raise click.UsageError("give at most one of --labels-from-gt and --image-labels")
    setup_logging(verbose)
    from labeler.jobs.refine import RefineMismatchError, RefineOptions, run_refine
    from labeler.jobs.refine.files import labels_from_gt as gt_labels
    from labeler.jobs.refine.files import labels_from_jsonl, pool_from_folder
    from labeler.train.model import EncoderWeightsUnavailable
    from labeler.train.trainer_settings import MapFitConfig, PseudoConfig, StudentConfig

    check_model_source(settings.model.source)
    try:
        pool = pool_from_folder(images_dir)
        per_image = None
        if labels_from_gt is not None:
            per_image = gt_labels(pool, labels_from_gt, names)
        elif image_labels is not None:
            per_image = labels_from_jsonl(pool, images_dir, image_labels, names)
        options = RefineOptions(
            labels=tuple(names),
            model=settings.model,
            stages=chosen,
            segmenter=settings.segmenter,
            pseudo=PseudoConfig(
                crf=crf, uncertain_threshold=uncertain_threshold, max_side=max_side
            ),
            student=StudentConfig(
                encoder=encoder,
                encoder_weights=None if encoder_weights == "none" else encoder_weights,
                image_size=crop_size,
                epochs=epochs,
                batch_size=train_batch_size,
                lr=lr,
                seed=seed,
                num_workers=workers,
            ),
            map_fit=MapFitConfig(steps=map_steps, seed=seed),
            val_gt=val_gt,
            image_labels=per_image,
            plusplus_masks=plusplus_masks,
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
