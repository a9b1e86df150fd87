"""The refine job's driver: StableSeg pseudo-masks -> StableSeg+ -> StableSeg++ on a pool.

Each step of :data:`~labeler.jobs.refine.steps.STEPS` runs in every process, then process 0
completes, scores and saves its record in ``W/state.json`` (the work dir's layout:
:mod:`labeler.jobs.refine.workdir`); a rerun goes on from the first unfinished step.

Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) the per-image steps are split over
the processes, training runs DistributedDataParallel, and process 0 writes the shared files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..distributed import Distributed
from ..io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    remove_stale_temporaries,
)
from ..refine_options import STAGES, RefineOptions
from ..storage import RemotePath
from .files import PoolItem, check_work_dir, pool_from_folder
from .report import assemble_report
from .steps import BY_NAME, Step, stage_outputs, steps_of
from .workdir import IMAGE_LABELS_FILE, STATE_FILE, WEIGHTS, RefineRun

log = logging.getLogger(__name__)


@dataclass
class RefineResult:
    """Where a run's products are; ``already_done`` when the rerun had nothing left to do."""

    work_dir: Path
    report: dict[str, Any]
    already_done: bool = False
    is_main: bool = True

    @property
    def students(self) -> dict[str, Path]:
        """Stage -> its student folder, for the stages the report has."""
        stages = self.report.get("stages", {})
        return {s: self.work_dir / stage_outputs(s)["student"] for s in STAGES if s in stages}

    @property
    def weights_path(self) -> Path | None:
        path = self.work_dir / WEIGHTS
        return path if path.exists() else None


def run_step(run: RefineRun, step: Step) -> None:
    """Run one step in every process; process 0 completes, scores and saves its record."""
    if run.dist.is_main:
        log.info("step %s", step.name)
    started = time.monotonic()
    record = step.work(run)
    run.dist.barrier()
    if run.dist.is_main:
        if step.finish is not None:
            step.finish(run, record)
        score(run, step, record)
        record["seconds"] = round(time.monotonic() - started, 3)
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        run.state["steps"][step.name] = record
        atomic_write_json(run.work / STATE_FILE, run.state)
        for temporary in step.temporaries:
            (run.work / temporary).unlink(missing_ok=True)
        write_report(run)
    run.dist.barrier()
    run.state = read_json(run.work / STATE_FILE, {"steps": {}})
    run.on_event(f"{step.name}.done")


def score(run: RefineRun, step: Step, record: dict[str, Any]) -> None:
    """Set the record's mIoU against --val-gt (None without it) for each mask it scores."""
    if not step.scored:
        return
    record["metrics"] = {name: run.evaluate(folder) for name, folder in step.scored.items()}
    record["val_gt"] = None if run.options.val_gt is None else str(run.options.val_gt)


def rescore(run: RefineRun) -> None:
    """Score the finished steps that ran without this --val-gt; rewrite state and report."""
    steps = _unscored(run.state, run.options.val_gt)
    if not steps or not run.dist.is_main:
        return
    for name in steps:
        log.info("scoring %s against %s", name, run.options.val_gt)
        score(run, BY_NAME[name], run.state["steps"][name])
    atomic_write_json(run.work / STATE_FILE, run.state)
    write_report(run)


def write_report(run: RefineRun) -> dict[str, Any]:
    """W/report.json and W/report.png from the finished steps' records."""
    from labeler.train.report import render_report_png

    report = assemble_report(
        run.state["steps"],
        settings=run.options.settings(),
        stages=run.options.stages,
        finished=all(run.done(s.name) for s in steps_of(run.options.stages)),
        pool_size=len(run.pool),
        background=run.options.background,
    )
    atomic_write_json(run.work / "report.json", report, indent=2)
    atomic_write_bytes(run.work / "report.png", render_report_png(report))
    return report


def _unscored(state: dict[str, Any], val_gt: str | os.PathLike[str] | None) -> list[str]:
    """Finished steps without metrics against ``val_gt`` (given after they ran)."""
    if val_gt is None:
        return []
    return [
        name
        for name, record in state["steps"].items()
        if name in BY_NAME and BY_NAME[name].scored and record.get("val_gt") != str(val_gt)
    ]


def _check_encoder(options: RefineOptions, dist: Distributed) -> None:
    """Build the student once: a bad encoder name or missing ImageNet weights fail now.

    Process 0 goes first, so the others find the weights in the cache.
    """
    from labeler.train.model import build_student

    config = options.student
    if dist.is_main:
        build_student(config.encoder, config.encoder_weights, len(options.labels))
    dist.barrier()
    if not dist.is_main:
        build_student(config.encoder, config.encoder_weights, len(options.labels))


def run_refine(
    images: str | os.PathLike[str] | RemotePath | Sequence[PoolItem],
    work_dir: str | os.PathLike[str],
    options: RefineOptions,
    on_event: Callable[[str], None] | None = None,
) -> RefineResult:
    """Run (or resume) StableSeg -> StableSeg+ -> StableSeg++ on a pool of images.

    Args:
        images: a folder or object storage URL (searched recursively) or a list of
            :class:`PoolItem`.
        work_dir: where every product and the resumable state live.
        on_event: called with ``"<step>.done"`` after each step and
            ``"<stage>.train.epoch<N>"`` after each checkpoint (progress hooks, tests).

    Raises:
        ValueError: bad options, an empty pool, a work dir of another run, unusable --val-gt.
        labeler.train.model.EncoderWeightsUnavailable: ImageNet weights cannot be downloaded.
    """
    work = Path(work_dir)
    folder = isinstance(images, str | os.PathLike | RemotePath)
    pool = pool_from_folder(images) if folder else list(images)
    if not pool:
        raise ValueError("the pool is empty")
    if options.val_gt is not None and not Path(options.val_gt).is_dir():
        raise ValueError(f"--val-gt {options.val_gt} is not a folder")
    if options.val_gt is not None and not any(
        (Path(options.val_gt) / f"{item.key}.png").exists() for item in pool
    ):
        raise ValueError(
            f"--val-gt {options.val_gt} has no mask for any pool image (expected "
            f"<val-gt>/<relative path without extension>.png, e.g. {pool[0].key}.png)"
        )
    record = check_work_dir(work, options, pool)
    state = read_json(work / STATE_FILE, {"steps": {}})
    wanted = steps_of(options.stages)
    finished = all(s.name in state["steps"] for s in wanted) and (work / "report.json").exists()
    if finished and not _unscored(state, options.val_gt):
        return RefineResult(work, read_json(work / "report.json"), already_done=True)
    needs_plus = "plusplus" in options.stages and "plus" not in options.stages
    if needs_plus and "plus.predict" not in state["steps"]:
        raise ValueError("stage plusplus needs the StableSeg+ predictions: add stage plus")

    dist = Distributed.from_environment(options.model.device)
    try:
        if dist.is_main:
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_json(work / "run.json", record, indent=2)
            if options.image_labels is not None:
                atomic_write_text(work / IMAGE_LABELS_FILE, options.image_labels.to_json())
        dist.barrier()
        run = RefineRun(pool, work, options, dist, on_event)
        rescore(run)  # --val-gt given to a rerun: score what already ran (process 0 only)
        if any(s.part == "train" and not run.done(s.name) for s in wanted):
            _check_encoder(options, dist)  # fail before hours of stage 1, not after
        for step in wanted:
            if not run.done(step.name):
                run_step(run, step)
        report = write_report(run) if dist.is_main else {}
        if dist.is_main:  # every process is past its last write: left-overs of a killed run
            remove_stale_temporaries(work)
        dist.barrier()
        return RefineResult(work, report, already_done=finished, is_main=dist.is_main)
    finally:
        dist.close()
