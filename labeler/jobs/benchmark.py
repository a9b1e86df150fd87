"""Benchmark StableSeg on a dataset preset, by the paper's protocol or the open one.

Layout of OUT (every file written atomically; a rerun overwrites them):

    benchmark.json   settings, per-class IoU, mIoU, pixel accuracy, images/s, skipped images,
                     and the sweep grid (with --sweep)
    table.md         the Markdown printed at the end: Table 1's row, or the sweep's grid
    preview.png      image | ground truth | prediction rows of the first images (--preview N)

With ``--save-masks DIR`` every predicted mask is written as ``DIR/<sample key>.png`` in the
dataset's own ids (``DatasetPreset.encode_prediction``: Cityscapes labelIds, ADE20K 1..150 with
0 = other, CamVid 0..10 with 11 = void, ...), the files evaluation servers take; with a sweep,
each point's masks go to ``DIR/<point>/`` (e.g. ``DIR/tiles=2/``).

Protocols (the score protocol, which pixels count, is the dataset preset's):

- ``paper``: each image is prompted with the classes present in its ground truth (the paper's
  section 5); an image whose ground truth holds no scored class is skipped with that reason.
- ``open``: every class of the dataset is in every prompt (the usual open-vocabulary protocol).

The model loads once; each sweep point is a :meth:`StableSeg.with_config` sharing its weights.
With ``--student DIR`` the model scored is a DeepLabV3+ trained by ``refine`` (``W/plus/student``
or ``W/plusplus/student``) instead of StableSeg: the paper's Table 5 scores its students on the
validation split, which ``refine`` (trained and reported on its pool) does not see.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from labeler.images import open_image
from labeler.jobs.sweep import SweepAxis, SweepPoint, sweep_points
from labeler.jobs.tables import (
    grid_markdown,
    method_name,
    paper_figures,
    sweep_grid,
    table1_markdown,
)
from labeler.labels import labels_record
from labeler.model_settings import ModelSettings

from .datasets import Dataset, open_dataset
from .io import Failure, atomic_write_bytes, atomic_write_json, atomic_write_text, image_bytes
from .pipeline import StageClock, default_workers
from .stage import Loaded, segment_stream

log = logging.getLogger(__name__)

FORMAT = "stableseg-benchmark/1"
PROTOCOLS = {
    "paper": "each image prompted with the classes present in its ground truth (paper, sec. 5)",
    "open": "every class of the dataset in every prompt (open vocabulary)",
}
NO_CLASS = "its ground truth holds no class to prompt it with (only background or ignored pixels)"
PREVIEW_HEIGHT = 160

Bar = Callable[[int, str], Any]
"""(total, description) -> a progress bar with ``update(n)`` and ``close()``."""


@dataclass(frozen=True)
class BenchmarkOptions:
    """One benchmark run.

    Attributes:
        dataset: a preset name (``labeler.datasets.preset_names()``).
        root: the dataset's folder (for ``folder``: the images folder).
        out: where benchmark.json, table.md and preview.png go.
        settings: the model and the base segmenter configuration.
        split: a split of the preset (None: the one papers report).
        protocol: ``paper`` or ``open`` (see the module docstring).
        limit: score the first N images of the split only.
        background: score ground-truth background as a class (True) or not (False); None keeps
            the preset's rule.
        labels, gt_dir, ignore_index: ``folder`` only (class names, ground-truth folder, raw ids
            not scored).
        sweep: axes of a sweep (``labeler.jobs.sweep``); empty for one configuration.
        preview: rows of the preview strip (0: none), from the first sweep point.
        save_masks: a folder for the predicted masks in the dataset's ids (see the module);
            None: none are written.
        student: a ``refine`` student folder to score instead of StableSeg (no sweep).
    """

    dataset: str
    root: Path
    out: Path
    settings: ModelSettings
    split: str | None = None
    protocol: str = "paper"
    limit: int | None = None
    background: bool | None = None
    labels: tuple[str, ...] | None = None
    gt_dir: Path | None = None
    ignore_index: tuple[int, ...] = ()
    sweep: tuple[SweepAxis, ...] = ()
    preview: int = 0
    save_masks: Path | None = None
    student: Path | None = None

    def __post_init__(self) -> None:
        if self.student is not None and self.sweep:
            raise ValueError("--student scores one trained DeepLabV3+: it takes no --sweep")
        if self.student is not None and self.settings.weights is not None:
            raise ValueError("--weights applies to StableSeg; it cannot be combined with --student")
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"unknown protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.preview < 0:
            raise ValueError(f"preview must be >= 0, got {self.preview}")


@dataclass
class PointScore:
    """What one configuration scored on the dataset."""

    point: SweepPoint
    metrics: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0
    previews: list[tuple[Any, np.ndarray, np.ndarray]] = field(default_factory=list)
    method: str | None = None  # the row's name when it is not StableSeg's (a student)

    def to_dict(self) -> dict[str, Any]:
        images = self.metrics["images"]
        return {
            "values": dict(self.point.values),
            "method": self.method or method_name(self.point.config.mask_settings()),
            "segmenter": config_json(self.point.config),
            **{k: v for k, v in self.metrics.items() if k != "protocol"},
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": _rate(images, self.seconds),
            "model_images_per_second": _rate(images, self.model_seconds),
        }


def _rate(images: int, seconds: float) -> float | None:
    return round(images / seconds, 4) if seconds > 0 and images else None


def config_json(config: Any) -> dict[str, Any]:
    """A SegmenterConfig as JSON-ready data, ``batch_size`` included."""
    return {**config.mask_settings(), "batch_size": config.batch_size}


def open_benchmark_dataset(options: BenchmarkOptions) -> Dataset:
    """The dataset the options name (ValueError / KeyError with what was expected)."""
    return open_dataset(
        options.dataset,
        options.root,
        options.split,
        background=options.background,
        labels=options.labels,
        gt_dir=options.gt_dir,
        ignore_index=options.ignore_index,
    )


@dataclass
class _Truth:
    """What a sample's reading gives back with its prediction (the stage's ``extra``)."""

    gt: np.ndarray  # (H, W) dataset ids
    image: Any = None  # the PIL image, kept only when preview rows are made


def score_point(
    dataset: Dataset,
    segmenter: Any,
    point: SweepPoint,
    protocol: str,
    limit: int | None = None,
    previews: int = 0,
    bar: Any = None,
    workers: int | None = None,
    save_masks: Path | None = None,
) -> PointScore:
    """Segment and score the first ``limit`` samples with one configuration.

    The samples go through the model stage (:func:`labeler.jobs.stage.segment_stream`): read
    by ``workers`` threads (default: :func:`~labeler.jobs.pipeline.default_workers`) and
    segmented in full batches; under the paper protocol each image is prompted with the
    classes of its ground truth, and images that share a label set share batches. The scores
    are sums over the images, so the order the stage yields them in does not matter; the
    preview rows and the skipped images are kept in the samples' order. With ``save_masks``
    each prediction is written there in the dataset's own ids (``<sample key>.png``).
    """
    preset = dataset.preset
    score = preset.new_score()
    result = PointScore(point, metrics={})
    samples = dataset.samples[:limit]
    clock = StageClock()
    skipped: list[tuple[int, dict[str, str]]] = []  # (sample index, record)
    rows: list[tuple[int, tuple[Any, np.ndarray, np.ndarray]]] = []  # heap of (-index, row)

    def load(index: int) -> Loaded:
        sample = samples[index]
        gt = dataset.read_gt(sample)
        image = open_image(sample.image)
        if (image.width, image.height) != (gt.shape[1], gt.shape[0]):
            sizes = f"{image.width}x{image.height} image, {gt.shape[1]}x{gt.shape[0]} mask"
            raise ValueError(f"size mismatch: {sizes}")
        subset = None  # the open protocol: every class
        if protocol == "paper":
            present = preset.classes_present(gt)
            if not present:
                raise ValueError(NO_CLASS)
            subset = tuple(present)
        return Loaded(image, subset, extra=_Truth(gt, image if previews else None))

    started = time.monotonic()
    stream = segment_stream(
        range(len(samples)),
        load,
        segmenter,
        preset.class_names,
        workers=workers or default_workers(),
        clock=clock,
    )
    with contextlib.closing(stream):
        for item in stream:
            if item.error is not None:
                skipped.append(
                    (item.key, Failure(samples[item.key].key, item.error, "image").to_dict())
                )
            else:
                truth: _Truth = item.extra
                pred = item.mask  # (H, W) dataset ids
                assert pred is not None
                score.add(pred, truth.gt)
                if save_masks is not None:
                    save_prediction(preset, pred, save_masks / f"{samples[item.key].key}.png")
                if len(rows) < previews or (rows and -rows[0][0] > item.key):
                    # one of the first ``previews`` scored samples so far
                    row = (-item.key, _preview_row(truth.image, truth.gt, pred))
                    if len(rows) < previews:
                        heapq.heappush(rows, row)
                    else:
                        heapq.heapreplace(rows, row)
            if bar is not None:
                bar.update(1)
    result.seconds = time.monotonic() - started
    result.model_seconds = clock.wall.get("model", 0.0)
    result.skipped = [record for _, record in sorted(skipped, key=lambda pair: pair[0])]
    result.previews = [row for _, row in sorted(rows, key=lambda pair: -pair[0])]
    result.metrics = score.summary()
    return result


def save_prediction(preset: Any, pred: np.ndarray, path: Path) -> None:
    """Write one predicted mask (project ids) at ``path`` in the dataset's own ids: a palette
    PNG for index ids, an RGB PNG with the id in red for UEC FoodPix (atomically)."""
    from PIL import Image

    from exporters.png import mask_to_png

    raw = preset.encode_prediction(pred)  # (H, W) or (H, W, 3) uint8
    image = Image.fromarray(raw, "RGB") if raw.ndim == 3 else mask_to_png(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, image_bytes(image))


def _preview_row(
    image: Any, gt: np.ndarray, pred: np.ndarray
) -> tuple[Any, np.ndarray, np.ndarray]:
    """The row at preview size (small, so a long run keeps little in memory)."""
    from PIL import Image

    scale = PREVIEW_HEIGHT / image.height
    if scale >= 1:
        return image.convert("RGB"), gt, pred
    size = (max(1, round(image.width * scale)), PREVIEW_HEIGHT)
    small = [
        np.asarray(Image.fromarray(m).resize(size, Image.Resampling.NEAREST)) for m in (gt, pred)
    ]
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR), small[0], small[1]


def markdown_for(dataset: Dataset, results: Sequence[PointScore], grid: dict | None) -> str:
    """Table 1's row (one configuration) or the sweep's grid."""
    if grid is not None:
        return grid_markdown(grid)
    (only,) = results
    method = only.method or method_name(only.point.config.mask_settings())
    return table1_markdown(
        dataset.preset.name, dataset.preset.title, method, only.metrics.get("mIoU")
    )


def run_benchmark(
    options: BenchmarkOptions, model: Any = None, bar: Bar | None = None
) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the content of benchmark.json.

    Args:
        options: what to measure.
        model: an already loaded ``StableSeg`` to use (its weights; each point sets its own
            configuration); None loads ``options.settings.model`` once.
        bar: a progress-bar factory (None: no bars).

    Raises:
        ValueError: a dataset layout not found, a sweep point or size selection this model
            cannot do (before any image is segmented), or no image scored at all.
    """
    dataset = open_benchmark_dataset(options)
    points = sweep_points(options.settings.segmenter, options.sweep)
    if options.student is not None:
        from .models import load_student_segmenter

        if model is None:
            model = load_student_segmenter(
                options.student, points[0].config, options.settings.model.device
            )
        segmenters = [model]
    else:
        if model is None:
            from .models import load_stableseg

            model = load_stableseg(options.settings.model, points[0].config)
        segmenters = [model.with_config(point.config) for point in points]
    for point, segmenter in zip(points, segmenters, strict=True):
        try:
            if options.student is None:
                segmenter.plan()
        except ValueError as err:
            where = f"sweep point {point.label()}: " if point.values else ""
            raise ValueError(f"{where}{err}") from None

    started = datetime.now(timezone.utc)
    total = len(dataset.samples[: options.limit])
    results = []
    for index, (point, segmenter) in enumerate(zip(points, segmenters, strict=True)):
        desc = f"benchmark {options.dataset}" + (f" [{point.label()}]" if point.values else "")
        progress = bar(total, desc) if bar is not None else None
        scored = score_point(
            dataset,
            segmenter,
            point,
            options.protocol,
            options.limit,
            previews=options.preview if index == 0 else 0,
            bar=progress,
            save_masks=_masks_folder(options, point),
        )
        if progress is not None:
            progress.close()
        if options.student is not None:
            scored.method = f"DeepLabV3+ student ({options.student})"
        if not scored.metrics["images"]:
            first = scored.skipped[0] if scored.skipped else {"image": "-", "reason": "no images"}
            raise ValueError(
                f"no image could be scored ({len(scored.skipped)} skipped; first: "
                f"{first['image']}: {first['reason']})"
            )
        log.info("%s mIoU %s", point.label() or options.dataset, scored.metrics["mIoU"])
        results.append(scored)

    grid = None
    if options.sweep:
        values = {axis.key: list(axis.values) for axis in options.sweep}
        grid = sweep_grid([a.key for a in options.sweep], values, [r.to_dict() for r in results])
    markdown = markdown_for(dataset, results, grid)
    report = _report(options, dataset, model, results, grid, markdown, started)
    options.out.mkdir(parents=True, exist_ok=True)
    if results[0].previews:
        from exporters.preview import comparison_strip

        strip = comparison_strip(results[0].previews, dataset.preset.class_names, PREVIEW_HEIGHT)
        atomic_write_bytes(options.out / "preview.png", image_bytes(strip))
        report["preview"] = "preview.png"
    atomic_write_text(options.out / "table.md", markdown)
    atomic_write_json(options.out / "benchmark.json", report, indent=2)
    return report


def _masks_folder(options: BenchmarkOptions, point: SweepPoint) -> Path | None:
    """Where a point's masks go: ``--save-masks``, or its subfolder named by the point."""
    if options.save_masks is None or not point.values:
        return options.save_masks
    name = "_".join(f"{key}={value}" for key, value in point.values.items())
    return options.save_masks / name.replace("/", "-").replace("<", "le").replace(" ", "")


def _notes(options: BenchmarkOptions, preset: Any) -> list[str]:
    """Warnings about settings that make a figure mean less than it seems."""
    segmenter = options.settings.segmenter
    notes = []
    predicts_background = (
        segmenter.background_prompt is not None or segmenter.background_threshold is not None
    )
    if preset.background_is_class and not predicts_background:
        notes.append(
            "background is scored as a class but the segmenter gives every pixel a label "
            "(no --background-prompt or --background-threshold): background IoU is 0"
        )
    if options.limit is not None:
        notes.append(f"only the first {options.limit} images of the split were used")
    return notes


def _report(
    options: BenchmarkOptions,
    dataset: Dataset,
    model: Any,
    results: Sequence[PointScore],
    grid: dict[str, Any] | None,
    markdown: str,
    started: datetime,
) -> dict[str, Any]:
    preset = dataset.preset
    settings = options.settings
    points = [r.to_dict() for r in results]
    report: dict[str, Any] = {
        "format": FORMAT,
        "started_at": started.isoformat(timespec="seconds"),
        "dataset": {
            "name": preset.name,
            "title": preset.title,
            "root": str(dataset.root),
            "split": dataset.split,
            "images_in_split": len(dataset.samples),
            "limit": options.limit,
            **labels_record(preset.class_names, key="classes"),
            "background_is_class": preset.background_is_class,
            "background_rule": preset.background_rule,
            "ignore_index": list(options.ignore_index),
            "score_protocol": preset.score_protocol().to_dict(),
            "unmatched": len(dataset.unmatched),
        },
        "protocol": options.protocol,
        "protocol_description": PROTOCOLS[options.protocol],
        "settings": {
            "model": asdict(settings.model),
            "segmenter": config_json(settings.segmenter),
            "weights": str(settings.weights) if settings.weights else None,
            "student": str(options.student) if options.student else None,
            "device": str(getattr(model, "device", settings.model.device)),
            "torch_dtype": str(getattr(model, "dtype", "float32")).removeprefix("torch."),
        },
        "paper": paper_figures(preset.name) if options.protocol == "paper" else {},
        "table": markdown,
        "notes": _notes(options, preset),
    }
    if grid is None:
        report.update(points[0])
    else:
        report["sweep"] = {
            "axes": {axis.key: list(axis.values) for axis in options.sweep},
            "grid": grid,
            "points": points,
        }
    return report
