"""The refine job as a table of steps: what each step does, what it writes, what gets scored.

:data:`STEPS` is read by the driver (which steps a run has, in order), the report (each stage's
outputs and parts) and the result (where the students and weights are). Each step's ``work``
runs in every process (the per-image steps take their share of the pool); its ``finish`` runs
in process 0 once every process is done (counts, checks). ``scored`` names the mask folders the
step's record scores against ``--val-gt``.

With per-image labels (``RefineRun.subset``) an image is prompted with its own labels only: its
cache entry holds those channels and names their global ids, and every step maps channels and
mask ids back to the global ids (``labeler.subsets.LabelSubset``) before writing a mask.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from labeler.images import ImageError, open_image
from labeler.result import IGNORE
from labeler.subsets import LabelSubset, segment_subsets

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..refine_options import FIRST_STAGE
from .files import load_pair, load_rgb, read_mask, write_mask
from .plusplus import fit, plusplus_pseudo, plusplus_pseudo_finish

if TYPE_CHECKING:
    from .run import RefineRun

log = logging.getLogger(__name__)

CACHE = "cache"
"""Folder of the attention-map cache, one ``<key>.safetensors`` per image (``<key>.skip`` for an
unreadable one)."""
PLAN_FILE = "plan.json"
WEIGHTS = "plusplus/weights.safetensors"


@dataclass(frozen=True)
class Step:
    """One step of a refine run.

    Attributes:
        name: ``stage`` or ``stage.part`` (``stableseg``, ``plus.train``, ...).
        work: does the step in every process; returns the step's record (process 0 keeps it).
        finish: process 0, after every process has finished ``work``: completes the record.
        outputs: report name -> path in the work dir, for the report's ``outputs``.
        scored: metric name -> mask folder in the work dir scored against ``--val-gt``.
        temporaries: paths in the work dir removed once the step's record is saved (a
            checkpoint that lets an interrupted step resume).
    """

    name: str
    work: Callable[[RefineRun], dict[str, Any]]
    finish: Callable[[RefineRun, dict[str, Any]], None] | None = None
    outputs: Mapping[str, str] = field(default_factory=dict)
    scored: Mapping[str, str] = field(default_factory=dict)
    temporaries: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return self.name.partition(".")[0]

    @property
    def part(self) -> str:
        return self.name.partition(".")[2]


# ---------------------------------------------------------------------------- stage 1
def skip(run: RefineRun, item: Any, reason: str) -> None:
    """Leave a pool image out of the run, saying why (``W/cache/<key>.skip``, the report)."""
    log.warning("skipping %s: %s", item.path, reason)
    atomic_write_text(run.out(CACHE, item, ".skip"), reason)


def stableseg(run: RefineRun) -> dict[str, Any]:
    """StableSeg masks of every pool image, and every attention layer's class map (the cache).

    With per-image labels each image is prompted with its own labels (images sharing a label
    set share a batch); its cache entry holds maps for those labels only, and names their
    global ids (``label_ids`` in the header). Its mask is written in global ids.
    """
    from labeler.train.cache import maps_to_bytes

    from ..models import load_stableseg

    # Images skipped by an earlier, unfinished attempt are tried again (the file may have been
    # fixed, or the read failed for a passing reason); once the step is done, that is final.
    todo = [
        item for item in run.mine(run.pool) if not run.out(CACHE, item, ".safetensors").exists()
    ]
    segmenter = None
    if todo or (run.dist.is_main and not (run.work / PLAN_FILE).exists()):
        segmenter = load_stableseg(run.options.model, run.options.segmenter, str(run.device))
        if run.dist.is_main:
            plan = segmenter.plan()
            record = {
                "cross": plan.cross,
                "self": plan.self_,
                "common_size": list(plan.common_size),
                "self_only": run.options.segmenter.self_only,
            }
            atomic_write_json(run.work / PLAN_FILE, record, indent=2)
    bar = run.bar(len(todo), "stage 1/3 StableSeg + attention cache")
    chunk_size = 2 * run.options.segmenter.batch_size
    for start in range(0, len(todo), chunk_size):
        images, good, subsets = [], [], []
        for item in todo[start : start + chunk_size]:
            subset = run.subset(item)
            if isinstance(subset, str):
                skip(run, item, subset)
                continue
            try:
                images.append(open_image(item.path))
            except ImageError as err:
                skip(run, item, str(err))
                continue
            good.append(item)
            subsets.append(subset)
        if good:
            assert segmenter is not None
            results = segment_subsets(
                segmenter, images, subsets, run.labels, return_layer_maps=True
            )
            for item, image, subset, result in zip(good, images, subsets, results, strict=True):
                write_mask(run.out("stableseg/masks", item), subset.to_global(result.mask))
                data = maps_to_bytes(
                    result.layer_maps or {},
                    subset.names(run.labels),
                    image.size,
                    extra={"label_ids": list(subset.ids)},
                )
                atomic_write_bytes(run.out(CACHE, item, ".safetensors"), data)
                run.out(CACHE, item, ".skip").unlink(missing_ok=True)
        bar.update(len(todo[start : start + chunk_size]))
    bar.close()
    return {}


def stableseg_finish(run: RefineRun, record: dict[str, Any]) -> None:
    skipped = [i for i in run.pool if run.out(CACHE, i, ".skip").exists()]
    record["images"] = len(run.usable)
    record["skipped"] = {
        str(i.path): run.out(CACHE, i, ".skip").read_text(encoding="utf-8") for i in skipped
    }
    if len(run.usable) < 2:
        raise ValueError(f"only {len(run.usable)} readable image(s) in the pool; need >= 2")


# ---------------------------------------------------------------------------- both stages
def cached(run: RefineRun, item: Any) -> tuple[dict[str, np.ndarray], LabelSubset]:
    """One image's cached layer maps (layer -> (C, h, w)) and the labels its channels hold."""
    from labeler.train.cache import maps_from_bytes

    path = run.out(CACHE, item, ".safetensors")
    maps, info = maps_from_bytes(path.read_bytes(), where=str(path))
    ids = info["extra"].get("label_ids")
    return maps, LabelSubset(tuple(ids)) if ids else LabelSubset.every(len(run.labels))


def weights_for(run: RefineRun, stage: str) -> tuple[dict[str, float], dict[str, float]]:
    """(cross, self) layer weights: the uniform plan (plus) or the learned ones (plusplus)."""
    plan = run.plan()
    if stage == "plus":
        return plan["cross"], plan["self"]
    from labeler.weights import load_map_weights

    learned = load_map_weights(run.work / WEIGHTS)
    return (
        {n: learned.get(n, 0.0) for n in plan["cross"]},
        {n: learned.get(n, 0.0) for n in plan["self"]},
    )


def pseudo(run: RefineRun, stage: str) -> dict[str, Any]:
    """Pseudo-masks from the cached maps with the stage's weights, through CRF."""
    from labeler.train.pseudo import masks_from_cache

    plan = run.plan()
    cross, selfs = weights_for(run, stage)
    todo = [i for i in run.mine(run.usable) if not run.out(f"{stage}/pseudo", i).exists()]
    bar = run.bar(len(todo), f"{stage}: {'CRF ' * run.options.pseudo.crf}pseudo-masks")
    segmenter = run.options.segmenter
    for item in todo:
        maps, subset = cached(run, item)
        rgb = load_rgb(item.path, run.options.pseudo.max_side)
        raw, mask = masks_from_cache(
            maps,
            rgb,
            (cross, selfs),
            tuple(plan["common_size"]),
            run.options.pseudo,
            len(subset),
            segmenter.background_threshold,
            plan["self_only"],
            background_channel=segmenter.background_prompt is not None,
        )
        if stage == "plusplus":
            write_mask(run.out("plusplus/stableseg", item), subset.to_global(raw))
        write_mask(run.out(f"{stage}/pseudo", item), subset.to_global(mask))
        bar.update(1)
    bar.close()
    return {}


def pseudo_finish(run: RefineRun, record: dict[str, Any], stage: str) -> None:
    ignored = total = 0
    for item in run.usable:
        mask = read_mask(run.out(f"{stage}/pseudo", item))
        ignored += int((mask == IGNORE).sum())
        total += mask.size
    record["ignored_fraction"] = ignored / max(total, 1)


def train(run: RefineRun, stage: str) -> dict[str, Any]:
    """A DeepLabV3+ on the stage's pseudo-masks, resumable epoch by epoch."""
    import torch

    from labeler.train.data import PseudoMaskDataset
    from labeler.train.loop import train_student
    from labeler.train.model import STUDENT_META_FILE, build_student, student_metadata

    config = run.options.student
    checkpoint = run.work / stage / "checkpoint.pt"
    resume = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else None
    max_side = run.options.pseudo.max_side
    sources = [
        partial(load_pair, item.path, run.out(f"{stage}/pseudo", item), max_side)
        for item in run.usable
    ]
    dataset = PseudoMaskDataset(
        sources, config.crop_size, config.scale_range, config.flip, config.seed
    )
    weights = None if resume is not None else config.encoder_weights
    model = build_student(config.encoder, weights, len(run.labels), seed=config.seed)

    def on_epoch_end(state: dict[str, Any]) -> None:
        if run.dist.is_main:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_write_bytes(checkpoint, buffer.getvalue())
        run.on_event(f"{stage}.train.epoch{state['epoch']}")

    started = len(resume["history"]["epoch_loss"]) if resume else 0
    if run.dist.is_main:
        log.info(
            "%s: training %s from epoch %d of %d", stage, config.encoder, started, config.epochs
        )
    history = train_student(
        model,
        dataset,
        config,
        run.device,
        resume=resume,
        on_epoch_end=on_epoch_end,
        progress=lambda total, desc: run.bar(total, f"{stage}: {desc}", "step", leave=False),
    )
    if run.dist.is_main:
        folder, temporary = run.work / stage / "student", run.work / stage / ".student.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        model.to("cpu").save_pretrained(str(temporary))
        meta = student_metadata(
            run.labels, run.options.background, config.crop_size, config.encoder
        )
        atomic_write_json(temporary / STUDENT_META_FILE, meta, indent=2)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    return {
        "epochs": history.epochs_done,
        "images": len(dataset),
        "epoch_loss": history.epoch_loss,
        "step_loss": history.step_loss,
    }


def predict(run: RefineRun, stage: str) -> dict[str, Any]:
    """The stage's student labels the pool."""
    from labeler.train.student import load_student, logits_to_mask, predict_logits

    student = load_student(run.work / stage / "student", device=run.device)
    todo = [i for i in run.mine(run.usable) if not run.out(f"{stage}/pred", i).exists()]
    bar = run.bar(len(todo), f"{stage}: student predictions")
    for item in todo:
        rgb = load_rgb(item.path, run.options.pseudo.max_side)
        logits = predict_logits(student.model, rgb, student.image_size, run.device)
        mask = logits_to_mask(logits, student.background).cpu().numpy().astype(np.uint8)
        write_mask(run.out(f"{stage}/pred", item), mask)
        bar.update(1)
    bar.close()
    return {}


# ---------------------------------------------------------------------------- the table
def _stage_steps(stage: str) -> list[Step]:
    """The pseudo-mask, training and prediction steps every self-training stage has."""
    if stage == "plusplus":
        work, finish = plusplus_pseudo, plusplus_pseudo_finish
    else:
        work, finish = partial(pseudo, stage=stage), partial(pseudo_finish, stage=stage)
    return [
        Step(
            f"{stage}.pseudo",
            work,
            finish,
            outputs={
                **({"stableseg_masks": "plusplus/stableseg"} if stage == "plusplus" else {}),
                "pseudo_masks": f"{stage}/pseudo",
            },
            scored={
                "pseudo_masks": f"{stage}/pseudo",
                **({"stableseg": "plusplus/stableseg"} if stage == "plusplus" else {}),
            },
        ),
        Step(
            f"{stage}.train",
            partial(train, stage=stage),
            outputs={"student": f"{stage}/student"},
            temporaries=(f"{stage}/checkpoint.pt",),
        ),
        Step(
            f"{stage}.predict",
            partial(predict, stage=stage),
            outputs={"predictions": f"{stage}/pred"},
            scored={"student": f"{stage}/pred"},
        ),
    ]


STEPS: tuple[Step, ...] = (
    Step(
        FIRST_STAGE,
        stableseg,
        stableseg_finish,
        outputs={"masks": "stableseg/masks", "cache": CACHE},
        scored={"stableseg": "stableseg/masks"},
    ),
    *_stage_steps("plus"),
    Step("plusplus.fit", fit, outputs={"weights": WEIGHTS}),
    *_stage_steps("plusplus"),
)
BY_NAME = {step.name: step for step in STEPS}


def steps_of(stages: tuple[str, ...]) -> list[Step]:
    """The steps of a run with these stages (the first stage always), in order."""
    chosen = {FIRST_STAGE, *stages}
    return [step for step in STEPS if step.stage in chosen]


def stage_outputs(stage: str) -> dict[str, str]:
    """Every output of a stage's steps, in step order (the report's ``outputs``)."""
    found: dict[str, str] = {}
    for step in STEPS:
        if step.stage == stage:
            found.update(step.outputs)
    return found


def stage_parts(stage: str) -> list[str]:
    """The parts of a self-training stage, in order (``pseudo``, ``train``, ...)."""
    return [step.part for step in STEPS if step.stage == stage and step.part]
