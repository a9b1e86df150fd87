"""The refine job's driver: StableSeg pseudo-masks -> StableSeg+ -> StableSeg++ on a pool.

Layout of the work dir W (every file written atomically; a step is done once state.json says
so, and a per-image step skips images whose output already exists; which step writes what is
the table in :mod:`labeler.jobs.refine.steps`):

    run.json                      settings and pool of the run (a rerun must match them)
    image_labels.json             per-image labels (--labels-from-gt / --image-labels): key -> ids
    plan.json                     the segmenter's layers, uniform weights and common size
    state.json                    finished steps with their times, losses and metrics
    cache/<key>.safetensors       every attention layer's class map, fp16 (stage 1)
    stableseg/masks/<key>.png     StableSeg masks (0 background, k = k-th label)
    plus/pseudo/<key>.png         CRF-cleaned pseudo-masks, 255 = uncertain (ignored)
    plus/checkpoint.pt            the student after the last finished epoch (while training)
    plus/student/                 DeepLabV3+ (smp save_pretrained + stableseg_student.json)
    plus/pred/<key>.png           the student's predictions on the pool
    plusplus/weights.safetensors  learned per-layer weights (+ weights.json)
    plusplus/stableseg/<key>.png  StableSeg masks with the learned weights (StableSeg run again;
                                  from the cache with --plusplus-masks cache)
    plusplus/pseudo, checkpoint.pt, student/, pred/   as for plus
    report.json, report.png       what ran, times, loss curves, weights, mIoU (--val-gt)

Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) the per-image steps are split over
the processes, training runs DistributedDataParallel, and process 0 writes the shared files.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from labeler.subsets import LabelSubset

from ..distributed import Distributed
from ..io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    remove_stale_temporaries,
)
from ..refine_options import STAGES, RefineOptions
from .files import PoolItem, check_work_dir, pool_from_folder, read_mask
from .steps import BY_NAME, PLAN_FILE, WEIGHTS, Step, stage_outputs, steps_of

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
IMAGE_LABELS_FILE = "image_labels.json"


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


class RefineRun:
    """One refine run in one process: the pool, paths, state and progress bars the steps use."""

    def __init__(
        self,
        pool: list[PoolItem],
        work_dir: Path,
        options: RefineOptions,
        dist: Distributed,
        on_event: Callable[[str], None] | None,
    ) -> None:
        self.pool, self.work, self.options, self.dist = pool, work_dir, options, dist
        self.on_event = on_event or (lambda name: None)
        self.labels = list(options.labels)
        device = torch.device(
            options.model.device
            or dist.device()
            or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if device.type == "cuda" and device.index is None:  # DDP wants the index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.state: dict[str, Any] = read_json(work_dir / STATE_FILE, {"steps": {}})

    # -- paths and bookkeeping
    def out(self, folder: str, item: PoolItem, suffix: str = ".png") -> Path:
        """``W/<folder>/<image key><suffix>``: one image's file of a step."""
        return self.work / folder / f"{item.key}{suffix}"

    def mine(self, items: Sequence[PoolItem]) -> list[PoolItem]:
        """This process's share of ``items``."""
        return list(items[self.dist.rank :: self.dist.world_size])

    @property
    def usable(self) -> list[PoolItem]:
        """Pool images with a cache entry (the unreadable ones are skipped)."""
        from .steps import CACHE

        return [i for i in self.pool if self.out(CACHE, i, ".safetensors").exists()]

    def bar(self, total: int, desc: str, unit: str = "img", leave: bool = True) -> Any:
        from tqdm.auto import tqdm

        show = self.options.progress and self.dist.is_main
        return tqdm(
            total=total, desc=desc, file=sys.stderr, disable=not show, leave=leave, unit=unit
        )

    def subset(self, item: PoolItem) -> LabelSubset | str:
        """The labels ``item`` is prompted with, or why it has none (it is then skipped)."""
        chosen = self.options.image_labels
        if chosen is None:
            return LabelSubset.every(len(self.labels))
        ids = chosen.ids.get(item.key)
        if ids is None:
            return f"no labels for it in {chosen.source}"
        if not ids:
            return f"{chosen.source} gives it none of the labels"
        return LabelSubset(ids)

    def done(self, step: str) -> bool:
        return step in self.state["steps"]

    def plan(self) -> dict[str, Any]:
        """The segmenter's layers, uniform weights and common size (written by stage 1)."""
        plan = read_json(self.work / PLAN_FILE)
        if plan is None:
            raise RuntimeError(f"{self.work}/{PLAN_FILE} is missing; delete the work dir and rerun")
        return plan

    # -- driving
    def run_step(self, step: Step) -> None:
        """Run one step in every process; process 0 completes, scores and saves its record."""
        if self.dist.is_main:
            log.info("step %s", step.name)
        started = time.monotonic()
        record = step.work(self)
        self.dist.barrier()
        if self.dist.is_main:
            if step.finish is not None:
                step.finish(self, record)
            self.score(step, record)
            record["seconds"] = round(time.monotonic() - started, 3)
            record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.state["steps"][step.name] = record
            atomic_write_json(self.work / STATE_FILE, self.state)
            for temporary in step.temporaries:
                (self.work / temporary).unlink(missing_ok=True)
            self.write_report()
        self.dist.barrier()
        self.state = read_json(self.work / STATE_FILE, {"steps": {}})
        self.on_event(f"{step.name}.done")

    # -- evaluation
    def score(self, step: Step, record: dict[str, Any]) -> None:
        """Set the record's mIoU against --val-gt (None without it) for each mask it scores."""
        if not step.scored:
            return
        record["metrics"] = {name: self.evaluate(folder) for name, folder in step.scored.items()}
        record["val_gt"] = None if self.options.val_gt is None else str(self.options.val_gt)

    def rescore(self) -> None:
        """Score the finished steps that ran without this --val-gt; rewrite state and report."""
        steps = _unscored(self.state, self.options.val_gt)
        if not steps or not self.dist.is_main:
            return
        for name in steps:
            log.info("scoring %s against %s", name, self.options.val_gt)
            self.score(BY_NAME[name], self.state["steps"][name])
        atomic_write_json(self.work / STATE_FILE, self.state)
        self.write_report()

    def evaluate(self, folder: str) -> dict[str, Any] | None:
        """mIoU of the masks in W/<folder> against --val-gt (None without it)."""
        from labeler.train.report import MaskScore

        if self.options.val_gt is None:
            return None
        score = MaskScore(self.labels, self.options.background)
        for item in self.usable:
            gt_path = Path(self.options.val_gt) / f"{item.key}.png"
            if gt_path.exists():
                try:
                    score.add(read_mask(self.out(folder, item)), read_mask(gt_path))
                except ValueError as err:
                    raise ValueError(f"--val-gt {gt_path}: {err}") from None
        return score.summary()

    def write_report(self) -> dict[str, Any]:
        from labeler.train.report import render_report_png

        from .report import assemble_report

        report = assemble_report(
            self.state["steps"],
            settings=self.options.settings(),
            stages=self.options.stages,
            finished=all(self.done(s.name) for s in steps_of(self.options.stages)),
            pool_size=len(self.pool),
            background=self.options.background,
        )
        atomic_write_json(self.work / "report.json", report, indent=2)
        atomic_write_bytes(self.work / "report.png", render_report_png(report))
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
    images: str | os.PathLike[str] | Sequence[PoolItem],
    work_dir: str | os.PathLike[str],
    options: RefineOptions,
    on_event: Callable[[str], None] | None = None,
) -> RefineResult:
    """Run (or resume) StableSeg -> StableSeg+ -> StableSeg++ on a pool of images.

    Args:
        images: a folder (searched recursively) or a list of :class:`PoolItem`.
        work_dir: where every product and the resumable state live.
        on_event: called with ``"<step>.done"`` after each step and
            ``"<stage>.train.epoch<N>"`` after each checkpoint (progress hooks, tests).

    Raises:
        ValueError: bad options, an empty pool, a work dir of another run, unusable --val-gt.
        labeler.train.model.EncoderWeightsUnavailable: ImageNet weights cannot be downloaded.
    """
    work = Path(work_dir)
    pool = pool_from_folder(images) if isinstance(images, (str, os.PathLike)) else list(images)
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
        run.rescore()  # --val-gt given to a rerun: score what already ran (process 0 only)
        if any(s.part == "train" and not run.done(s.name) for s in wanted):
            _check_encoder(options, dist)  # fail before hours of stage 1, not after
        for step in wanted:
            if not run.done(step.name):
                run.run_step(step)
        report = run.write_report() if dist.is_main else {}
        if dist.is_main:  # every process is past its last write: left-overs of a killed run
            remove_stale_temporaries(work)
        dist.barrier()
        return RefineResult(work, report, already_done=finished, is_main=dist.is_main)
    finally:
        dist.close()
