"""A self-training stage's student: trained on the stage's pseudo-masks, then labelling the
pool (StableSeg+ and StableSeg++ alike)."""

from __future__ import annotations

import io
import logging
import os
import shutil
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io import atomic_write_bytes, atomic_write_json
from .files import load_pair, load_rgb, write_mask

if TYPE_CHECKING:
    from .workdir import RefineRun

log = logging.getLogger(__name__)


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
