"""Pseudo-label a folder: a bounded pipeline, per-image results stored as they finish,
exports streamed from them at the end.

    reading threads        decode, EXIF, model input, preview base, ground-truth labels
        | at most batch + readers images ahead of the model
    main thread            the model (segment), one batch at a time
        | at most batch + writers images waiting for a writer
    writing threads        CRF, mask PNG, COCO and Label Studio pieces, preview, record

Memory does not grow with the folder: each queue is bounded, and the model waits for the
writers only when they are the bottleneck. ``--workers N`` sets both pools (default: the CPUs
this process may use). See :mod:`labeler.jobs.layout` for OUT_DIR's files; every file is
written atomically, so a kill at any moment leaves either the old file or the new one, and a
rerun labels only the images without a record and assembles the exports again
(:mod:`labeler.jobs.exports`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from .distributed import Distributed
from .exports import assemble_exports
from .finishing import WritePlan, write_image
from .io import (
    IMAGE_EXTENSIONS,
    RunMismatchError,
    Skipped,
    atomic_write_json,
    check_run_file,
    list_images,
    read_jsonl,
    remove_stale_temporaries,
    write_jsonl,
)
from .labelling import segment_batch
from .layout import PER_IMAGE_FOLDERS, RUN_FILE, record_path, stem_path
from .pipeline import Backlog, StageClock, WriterPool, default_workers, ordered_map
from .pseudo_label_options import FORMATS, PseudoLabelOptions
from .reading import ImageItem, ReadPlan, read_image

log = logging.getLogger(__name__)


class Segmenter(Protocol):
    """What the job needs of a model: StableSeg, or a trained student.

    ``return_probs`` is asked only for ``--crf``. A segmenter that sets
    ``accepts_prepared_images = True`` is given :class:`labeler.images.PreparedImage` items
    made at ``config.image_size`` by the reading threads instead of full-size arrays.
    """

    model_version: str

    def segment(
        self, images: Any, labels: Sequence[str], *, return_probs: bool = False
    ) -> list[Any]: ...


__all__ = [
    "NoImagesError",
    "PseudoLabelOptions",
    "RunMismatchError",
    "Summary",
    "run",
    "stem_path",
]


class NoImagesError(ValueError):
    """The image folder holds no image at all."""


@dataclass
class Summary:
    total: int = 0
    labelled: int = 0
    already_done: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    stats: LabelStats | None = None

    @property
    def exit_code(self) -> int:
        return 3 if self.skipped else 0


# ---------------------------------------------------------------------------- planning
def check_run(options: PseudoLabelOptions) -> dict[str, Any]:
    """Compare the options with OUT_DIR/run.json. Returns the signature to write."""
    signature = options.signature()
    if not options.overwrite:
        check_run_file(
            options.out_dir / RUN_FILE,
            signature,
            "Use another --out, or --overwrite to start it again.",
        )
    return signature


def discover(options: PseudoLabelOptions) -> tuple[list[Path], list[Skipped]]:
    """The input images, and those refused up front (outputs that would collide)."""
    images = list_images(options.images_dir)
    owners: dict[PurePosixPath, Path] = {}
    keep, refused = [], []
    for relative in images:
        key = stem_path(relative)
        if key in owners:
            refused.append(
                Skipped(
                    relative.as_posix(),
                    f"its mask name {key}.png is already taken by {owners[key].as_posix()}",
                )
            )
            continue
        owners[key] = relative
        keep.append(relative)
    return keep, refused


# ---------------------------------------------------------------------------- labelling
@dataclass
class LabelStats:
    """What the pipeline did: CPU time per stage, and how many images each queue held.

    ``waiting`` counts images read and not yet through the model (its peak is at most
    ``2 * batch + readers``); ``writing`` counts images queued or being written (at most
    ``batch + writers``).
    """

    clock: StageClock = field(default_factory=StageClock)
    waiting: Backlog = field(default_factory=Backlog)
    writing: Backlog = field(default_factory=Backlog)
    readers: int = 0
    writers: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall time: "label", "exports"


def _prepared_size(options: PseudoLabelOptions, model: Segmenter | None) -> int | None:
    """The model input side when the segmenter takes prepared images, else None."""
    if options.student is not None:
        return None
    if model is None:
        from labeler.segmenter import StableSeg

        takes = getattr(StableSeg, "accepts_prepared_images", False)
        return options.segmenter.image_size if takes else None
    if not getattr(model, "accepts_prepared_images", False):
        return None
    config = getattr(model, "config", None)
    return int(getattr(config, "image_size", options.segmenter.image_size))


def _batches(
    items: Iterable[ImageItem], size: int, refuse: Callable[[ImageItem], None]
) -> Iterator[list[ImageItem]]:
    """Readable images in batches of ``size`` (the last may be shorter); others refused."""
    batch: list[ImageItem] = []
    for item in items:
        if item.error is not None:
            refuse(item)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def label_images(
    get_model: Callable[[], Segmenter],
    options: PseudoLabelOptions,
    pending: Sequence[Path],
    on_progress: Callable[[int], None] | None = None,
    stats: LabelStats | None = None,
    prepared_size: int | None = None,
) -> tuple[int, list[Skipped]]:
    """Label ``pending`` images through the pipeline; returns (labelled count, skipped).

    ``get_model`` is called once, when the first readable image comes: a rerun whose only
    pending images are broken files does not load the model. ``prepared_size`` is the model
    input side when the segmenter takes prepared images (see :mod:`labeler.jobs.reading`).
    """
    stats = stats or LabelStats()
    workers = options.workers or default_workers()
    stats.readers = stats.writers = workers
    batch_size = options.segmenter.batch_size
    clock, lock = stats.clock, threading.Lock()
    skipped: list[Skipped] = []

    def progress(n: int) -> None:
        if on_progress is not None:
            with lock:
                on_progress(n)

    read_plan = ReadPlan(
        images_dir=Path(options.images_dir),
        max_pixels=options.max_pixels,
        prepared_size=prepared_size,
        preview=options.preview,
        keep_rgb=options.crf,
        gt_dir=options.labels_from_gt,
        num_labels=len(options.labels),
    )

    def read(relative: Path) -> ImageItem:
        with clock.measure("read"):
            item = read_image(read_plan, relative)
        stats.waiting.add()
        return item

    def refuse(item: ImageItem) -> None:
        stats.waiting.remove()
        skipped.append(Skipped(item.relative.as_posix(), str(item.error)))
        progress(1)

    model: Segmenter | None = None
    write_plan: WritePlan | None = None
    labelled = 0

    def write(item: ImageItem, result: Any) -> None:
        assert write_plan is not None
        write_image(write_plan, item, result, clock)
        progress(1)

    items = ordered_map(read, pending, workers, ahead=batch_size + workers)
    with (
        contextlib.closing(items),  # on an error: stop the readers now, not when collected
        WriterPool(workers, max_pending=batch_size + workers, backlog=stats.writing) as pool,
    ):
        for batch in _batches(items, batch_size, refuse):
            if model is None:
                model = get_model()
                write_plan = WritePlan(
                    out_dir=options.out_dir,
                    labels=list(options.labels),
                    formats=tuple(options.formats),
                    preview=options.preview,
                    crf=options.crf,
                    background_threshold=options.segmenter.background_threshold,
                    model_version=model.model_version,
                )
            with clock.measure("model", len(batch)):
                results = segment_batch(
                    model,
                    [item.model_input for item in batch],
                    [item.gt_ids for item in batch],
                    options.labels,
                    want_probs=options.crf,
                )
            stats.waiting.remove(len(batch))
            for item, result in zip(batch, results, strict=True):
                item.model_input = None  # the writers need only the preview (and rgb for CRF)
                pool.submit(write, item, result)
                labelled += 1
    return labelled, skipped


# ---------------------------------------------------------------------------- the run
def load_model(options: PseudoLabelOptions, device: str | None) -> Segmenter:
    """StableSeg from --model (with --weights), or the trained student from --student."""
    if options.student is not None:
        return _StudentAdapter(options, device or options.model.device)
    from .models import load_stableseg

    return load_stableseg(options.model, options.segmenter, device)


class _StudentAdapter:
    """A trained DeepLabV3+ (``refine``'s output) behind the Segmenter protocol.

    The student runs at the size it was trained at; ``--image-size`` applies to StableSeg.
    """

    def __init__(self, options: PseudoLabelOptions, device: str | None) -> None:
        from labeler.train.student import load_student

        assert options.student is not None
        folder = Path(options.student)
        self.student = load_student(folder, device=device)
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        self.model_version = f"student-{digest.hexdigest()[:12]}"

    def segment(self, images: Any, labels: Sequence[str], return_probs: bool = False) -> list[Any]:
        from labeler.train.student import student_segment

        results = student_segment(self.student, images, labels)
        if not return_probs:
            for result in results:
                result.probs = None
        return results


def run(
    options: PseudoLabelOptions,
    progress: Callable[[int, int], Any] | None = None,
    model: Segmenter | None = None,
) -> Summary:
    """Label every image of the folder that is not done yet, then rebuild the exports.

    Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) each process labels its share
    and process 0 assembles the exports once all are done.

    Args:
        progress: ``progress(total, initial)`` returns an object with ``update(n)`` and
            ``close()`` (a tqdm bar); only process 0 shows one.
        model: an already loaded segmenter (the model options are then not used to load one).
    """
    started = time.monotonic()
    unknown = sorted(set(options.formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown --format {unknown}; choose from {list(FORMATS)}")
    signature = check_run(options)
    images, refused = discover(options)
    if not images and not refused:
        raise NoImagesError(
            f"no images under {options.images_dir} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "recursively; hidden files and folders are left out)"
        )
    dist = Distributed.from_environment(options.model.device)
    out = options.out_dir
    fresh = options.overwrite or not (out / RUN_FILE).exists()
    if options.overwrite:
        pending = list(images)
    else:
        pending = [r for r in images if not record_path(out, r).exists()]
    mine = pending[dist.rank :: dist.world_size]
    loaded = model
    if fresh and mine and loaded is None:
        # A new run writes nothing into OUT_DIR before its model has loaded: a model that
        # cannot load leaves no run.json behind to refuse the corrected command.
        loaded = load_model(options, dist.device())
    if dist.is_main:
        if options.overwrite:
            for sub in PER_IMAGE_FOLDERS:
                shutil.rmtree(out / sub, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, signature, indent=2)
    dist.barrier()

    summary = Summary(total=len(images) + len(refused), already_done=len(images) - len(pending))
    bar = progress(len(mine), 0) if (progress is not None and dist.is_main) else None

    def get_model() -> Segmenter:
        return loaded or load_model(options, dist.device())

    stats = LabelStats()
    label_started = time.monotonic()
    labelled, skipped = label_images(
        get_model,
        options,
        mine,
        bar.update if bar else None,
        stats,
        prepared_size=_prepared_size(options, loaded),
    )
    summary.stats = stats
    stats.seconds["label"] = time.monotonic() - label_started
    if bar is not None:
        bar.close()
    part = options.out_dir / ".parts" / f"rank{dist.rank}.jsonl"
    write_jsonl(part, [{"labelled": labelled}, *(s.to_dict() for s in skipped)])
    dist.barrier()

    if dist.is_main:
        all_skipped = list(refused)
        total_labelled = 0
        for rank in range(dist.world_size):
            rows = list(read_jsonl(options.out_dir / ".parts" / f"rank{rank}.jsonl"))
            total_labelled += sum(r.get("labelled", 0) for r in rows)
            all_skipped += [Skipped(r["path"], r["reason"]) for r in rows if "path" in r]
        shutil.rmtree(options.out_dir / ".parts", ignore_errors=True)
        all_skipped.sort(key=lambda s: s.path)
        write_jsonl(options.out_dir / "skipped.jsonl", [s.to_dict() for s in all_skipped])
        summary.labelled, summary.skipped = total_labelled, all_skipped
        exports_started = time.monotonic()
        with stats.clock.measure("exports", len(images)):
            summary.outputs = assemble_exports(options, images)
        stats.seconds["exports"] = time.monotonic() - exports_started
        summary.outputs["skipped"] = str(options.out_dir / "skipped.jsonl")
        remove_stale_temporaries(options.out_dir)  # left-overs of a killed run
    dist.barrier()
    dist.close()
    summary.seconds = time.monotonic() - started
    return summary


def summary_dict(summary: Summary) -> dict[str, Any]:
    """The summary as JSON-ready data (the number of skipped images, not their list)."""
    data = {f.name: getattr(summary, f.name) for f in fields(summary) if f.name != "stats"}
    data["skipped"] = len(summary.skipped)
    data["outputs"] = dict(summary.outputs)
    return data
