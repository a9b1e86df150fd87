"""A refine run's work dir and its view from one process: paths, state, this process's share.

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

:class:`RefineRun` is what every step gets: it imports no step, so the steps, the table of
steps and the driver (:mod:`labeler.jobs.refine.run`) all import it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from labeler.subsets import LabelSubset

from ..distributed import Distributed
from ..io import read_json
from ..pipeline import default_workers
from ..refine_options import RefineOptions
from .files import PoolItem, read_mask

CACHE = "cache"
"""Folder of the attention-map cache, one ``<key>.safetensors`` per image (``<key>.skip`` for an
unreadable one)."""
PLAN_FILE = "plan.json"
STATE_FILE = "state.json"
IMAGE_LABELS_FILE = "image_labels.json"
WEIGHTS = "plusplus/weights.safetensors"
READERS = 4
"""The most threads reading images for the StableSeg passes (the model is the bottleneck; each
thread holds a full-size image)."""


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
        return [i for i in self.pool if self.out(CACHE, i, ".safetensors").exists()]

    @property
    def readers(self) -> int:
        """Threads reading images for the StableSeg passes: :data:`READERS`, fewer with fewer
        CPUs (per process under torchrun)."""
        return min(READERS, default_workers())

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

    # -- evaluation
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
