"""Pseudo-label a folder: a bounded pipeline, per-image results stored as they finish,
exports streamed from them at the end.

    reading threads        decode, EXIF, ground-truth labels, preview base, model input
        | at most batch + readers images ahead of the model
    main thread            the model (segment), one full batch at a time
        | at most batch + writers images waiting for a writer
    writing threads        CRF, mask PNG, export pieces (COCO, Label Studio, YOLO), preview,
                           record

The first two are the model stage (:func:`labeler.jobs.stage.segment_stream`), which every
product shares; this job gives it its reading (:mod:`labeler.jobs.reading`) and writes what
comes out (:mod:`labeler.jobs.writing`).

Memory does not grow with the folder: each queue is bounded, and the model waits for the
writers only when they are the bottleneck. ``--workers N`` sets both pools (default: the CPUs
this process may use). See :mod:`labeler.jobs.layout` for OUT_DIR's files; every file is
written atomically, so a kill at any moment leaves either the old file or the new one, and a
rerun labels only the images without a record and assembles the exports again
(:mod:`labeler.jobs.exports`). IMAGES_DIR and OUT_DIR may be in object storage
(``s3://bucket/prefix``, :mod:`labeler.jobs.storage`) with the same guarantees: every object is
uploaded whole and the records, uploaded last, are the manifest a resume trusts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, cast

from .dataset_exports import check_formats
from .distributed import Distributed
from .exports import assemble_exports
from .io import (
    IMAGE_EXTENSIONS,
    Failure,
    RunMismatchError,
    atomic_write_json,
    check_run_file,
    list_images,
    read_jsonl,
    remove_stale_temporaries,
    remove_tree,
    stored_stems,
    write_jsonl,
)
from .layout import PER_IMAGE_FOLDERS, RUN_FILE, stem_path
from .pipeline import Backlog, StageClock, WriterPool
from .pseudo_label_options import FORMATS, PseudoLabelOptions
from .reading import ReadPlan, read_image
from .stage import Loaded, Segmented, StageModel, queue_behind, segment_stream
from .storage import check_writable, describe
from .writing import WritePlan, write_image

log = logging.getLogger(__name__)


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
    skipped: list[Failure] = field(default_factory=list)
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
    check_writable(options.out_dir, "--out")
    if not options.overwrite:
        check_run_file(
            options.out_dir / RUN_FILE,
            signature,
            "Use another --out, or --overwrite to start it again.",
        )
    return signature


def discover(options: PseudoLabelOptions) -> tuple[list[Path], list[Failure]]:
    """The input images, and those refused up front (names that are not UTF-8, outputs that
    would collide). OUT_DIR and every other run folder under IMAGES_DIR are not read (see
    :func:`labeler.jobs.io.list_images`).

    Raises:
        ValueError: OUT_DIR is IMAGES_DIR itself (its outputs would be read as inputs).
    """
    if describe(options.out_dir) == describe(options.images_dir):  # a path or a URL
        raise ValueError(
            f"--out {options.out_dir} is IMAGES_DIR itself: its masks and previews would be "
            "labelled as images on the next run; give --out a folder of its own (a subfolder "
            "of IMAGES_DIR is fine)"
        )
    refused: list[Failure] = []
    images = list_images(options.images_dir, exclude=[options.out_dir], refused=refused)
    owners: dict[PurePosixPath, Path] = {}
    keep = []
    for relative in images:
        key = stem_path(relative)
        if key in owners:
            refused.append(
                Failure(
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

    ``waiting`` counts images being read, or read and not yet through the model: at most
    ``2 * batch + readers`` when every image is prompted with every label (a batch being
    segmented, and the stage's readers ahead of it); with ``--labels-from-gt`` images of a
    rarer label set also wait for a full batch of theirs (at most ``4 * batch`` of them).
    ``writing`` counts images queued or being written (at most ``batch + writers``).
    """

    clock: StageClock = field(default_factory=StageClock)
    waiting: Backlog = field(default_factory=Backlog)
    writing: Backlog = field(default_factory=Backlog)
    readers: int = 0
    writers: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall time: "label", "exports"


def label_images(
    model: StageModel,
    options: PseudoLabelOptions,
    pending: Sequence[Path],
    on_progress: Callable[[int], None] | None = None,
    stats: LabelStats | None = None,
) -> tuple[int, list[Failure]]:
    """Label ``pending`` images through the model stage and the writers; returns (labelled
    count, skipped).

    ``model.input_size`` decides whether JPEGs may be decoded at a reduced scale (see
    :mod:`labeler.jobs.reading`).
    """
    stats = stats or LabelStats()
    workers = options.thread_count()
    stats.readers = stats.writers = workers
    lock = threading.Lock()
    skipped: list[Failure] = []

    def progress(n: int) -> None:
        if on_progress is not None:
            with lock:
                on_progress(n)

    read_plan = ReadPlan.for_run(options, model.input_size)
    write_plan = WritePlan.for_run(options, model.model_version)

    def load(relative: Path) -> Loaded:
        stats.waiting.add()  # taken off when the image comes out of the stage
        return read_image(read_plan, relative)

    def write(item: Segmented[Path]) -> None:
        write_image(write_plan, item, stats.clock)
        progress(1)

    labelled = 0
    stream = segment_stream(
        pending,
        load,
        model,
        options.labels,
        workers=workers,
        return_probs=options.crf,
        clock=stats.clock,
    )
    with (
        contextlib.closing(stream),  # on an error: stop the readers now, not when collected
        WriterPool(
            workers, max_pending=queue_behind(model, workers), backlog=stats.writing
        ) as pool,
    ):
        for item in stream:
            stats.waiting.remove()
            if item.error is not None:
                skipped.append(Failure(item.key.as_posix(), item.error))
                progress(1)
                continue
            if not options.crf:
                item.result = None  # the writers need the mask, the scores and the pictures
            pool.submit(write, item)
            labelled += 1
    return labelled, skipped


# ---------------------------------------------------------------------------- the run
def load_model(options: PseudoLabelOptions, device: str | None) -> StageModel:
    """StableSeg from --model (with --weights), or the trained student from --student."""
    if options.student is not None:
        from .models import load_student_segmenter

        return load_student_segmenter(
            options.student, options.segmenter, device or options.model.device
        )
    from .models import load_stableseg

    return load_stableseg(options.model, options.segmenter, device)


def run(
    options: PseudoLabelOptions,
    progress: Callable[[int, int], Any] | None = None,
    model: StageModel | Callable[[], StageModel] | None = None,
) -> Summary:
    """Label every image of the folder that is not done yet, then rebuild the exports.

    Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) each process labels its share
    and process 0 assembles the exports once all are done. With ``--engine ray`` the
    labelling runs on a Ray cluster (:mod:`labeler.jobs.ray_engine`), the rest here.

    Args:
        progress: ``progress(total, initial)`` returns an object with ``update(n)`` and
            ``close()`` (a tqdm bar); only process 0 shows one.
        model: an already loaded model (the model options are then not used to load one), or
            a function that loads it (picklable for ``--engine ray``: each actor calls it).
    """
    started = time.monotonic()
    unknown = sorted(set(options.formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown --format {unknown}; choose from {list(FORMATS)}")
    check_formats(options.formats, options.out_dir)
    if options.engine == "ray":
        from .ray_engine import require_ray

        require_ray()  # a missing extra fails before anything is read or written
    signature = check_run(options)
    images, refused = discover(options)
    if not images and not refused:
        raise NoImagesError(
            f"no images under {options.images_dir} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "recursively; hidden files and folders are left out)"
        )
    dist = Distributed.from_environment(options.model.device)
    if options.engine == "ray" and dist.world_size > 1:
        raise ValueError(
            "--engine ray spreads the work over a Ray cluster from one process: run it without "
            "torchrun / accelerate launch"
        )
    out = options.out_dir
    if options.overwrite:
        pending = list(images)
    else:  # one listing of the records (the manifest), not one request an image
        done = stored_stems(out / "records", ".json")
        pending = [r for r in images if stem_path(r) not in done]
    mine = pending[dist.rank :: dist.world_size]
    opener: Callable[[], StageModel] | None = None  # --engine ray: each actor loads its model
    if options.engine == "ray":
        opener = functools.partial(load_model, options, None) if model is None else model
        if hasattr(opener, "segment"):  # a loaded model: shipped to each actor
            opener = functools.partial(_same, opener)
        model = None
    elif mine and model is not None and not hasattr(model, "segment"):
        model = cast(Callable[[], StageModel], model)()
    if mine and model is None and opener is None:
        # Loaded before anything is written into OUT_DIR: a model that cannot load leaves no
        # run.json behind to refuse the corrected command. Its input size decides how the
        # images are decoded. A process with nothing to label loads nothing.
        model = load_model(options, dist.device())
    if dist.is_main:
        if options.overwrite:
            for sub in PER_IMAGE_FOLDERS:  # records first: no mask outlives its record
                remove_tree(out / sub)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, signature, indent=2)
    dist.barrier()

    summary = Summary(total=len(images) + len(refused), already_done=len(images) - len(pending))
    bar = progress(len(mine), 0) if (progress is not None and dist.is_main) else None
    stats = LabelStats()
    label_started = time.monotonic()
    skipped: list[Failure]
    labelled, skipped = 0, []  # a process with nothing to label
    if opener is not None and mine:
        from .ray_engine import label_with_ray

        labelled, skipped = label_with_ray(options, mine, opener, bar.update if bar else None)
    elif model is not None and mine:
        model = cast(StageModel, model)
        labelled, skipped = label_images(model, options, mine, bar.update if bar else None, stats)
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
            all_skipped += [Failure(r["path"], r["reason"]) for r in rows if "path" in r]
        remove_tree(options.out_dir / ".parts")
        all_skipped.sort(key=lambda s: s.item)
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


def _same(model: StageModel) -> StageModel:
    """The model given (``--engine ray`` with an already loaded model: each actor gets a
    copy)."""
    return model


def summary_dict(summary: Summary) -> dict[str, Any]:
    """The summary as JSON-ready data (the number of skipped images, not their list)."""
    data = {f.name: getattr(summary, f.name) for f in fields(summary) if f.name != "stats"}
    data["skipped"] = len(summary.skipped)
    data["outputs"] = dict(summary.outputs)
    return data
