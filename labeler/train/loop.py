"""Training the DeepLabV3+ student: SGD with a poly schedule, ignore_index=255, AMP, DDP.

The loop is file-free: every finished epoch is handed to ``on_epoch_end`` as a checkpoint dict
(the job writes it), and a checkpoint dict passed back as ``resume`` continues from there,
reproducing an uninterrupted run (model, optimizer, scaler and RNG state are all restored; the
sampling order and augmentation depend on the seed and the epoch only).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..result import IGNORE
from .data import PseudoMaskDataset
from .model import unwrap
from .trainer_settings import StudentConfig


class Progress(Protocol):
    """What the loop reports to (tqdm fits)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, *args: Any, **kwargs: Any) -> Any: ...

    def close(self) -> Any: ...


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


ProgressFactory = Callable[[int, str], Progress]


@dataclass
class TrainHistory:
    """Loss curves of one training run.

    Attributes:
        epoch_loss: mean loss of each finished epoch.
        step_loss: loss of every optimizer step (the mean over processes under DDP).
        epochs_done: finished epochs (equals ``len(epoch_loss)``).
    """

    epoch_loss: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)

    @property
    def epochs_done(self) -> int:
        return len(self.epoch_loss)


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """``base_lr * (1 - step / total_steps) ** power``."""
    return base_lr * max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over pixels that are not 255; exactly 0 when all are ignored.

    Args:
        logits: (B, K, H, W).
        target: (B, H, W) ids in 0..K-1 or 255.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    valid = (target != IGNORE).sum().clamp(min=1)
    return total / valid


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _autocast(device: torch.device, enabled: bool) -> tuple[AbstractContextManager, bool]:
    """(autocast context, whether a gradient scaler is needed)."""
    if not enabled or device.type != "cuda":
        return nullcontext(), False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype == torch.float16


def train_student(
    model: torch.nn.Module,
    dataset: PseudoMaskDataset,
    config: StudentConfig,
    device: torch.device,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    progress: ProgressFactory | None = None,
) -> TrainHistory:
    """Train ``model`` in place on the pseudo-masks; returns the loss curves.

    Under an initialised ``torch.distributed`` process group the model is wrapped in
    DistributedDataParallel and each process sees its share of every epoch.

    Args:
        resume: a checkpoint dict from ``on_epoch_end`` of an earlier, interrupted run.
        on_epoch_end: called on every process after each epoch with the checkpoint dict
            (``epoch``, ``model``, ``optimizer``, ``scaler``, ``rng``, ``history``).
        progress: ``progress(total, description)`` -> a bar for one epoch's steps.
    """
    rank, world = _distributed()
    model.to(device)
    history = TrainHistory()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    autocast, needs_scaler = _autocast(device, config.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        history = TrainHistory(**resume["history"])
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda" and resume["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
    train_model: torch.nn.Module = model
    if world > 1:
        device_ids = [device] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # Drop a last batch too small for BatchNorm; with fewer images than a batch, take them all.
    per_rank = -(-len(dataset) // world)
    batch_size = min(config.train_batch_size, per_rank)
    if batch_size < 2:
        raise ValueError(
            f"{len(dataset)} training image(s) over {world} process(es): each process needs "
            "at least 2 per batch (BatchNorm); add images or use fewer processes"
        )
    steps_per_epoch = per_rank // batch_size
    total_steps = steps_per_epoch * config.epochs
    progress = progress or (lambda total, desc: _NoProgress())

    for epoch in range(history.epochs_done, config.epochs):
        dataset.set_epoch(epoch)
        if world > 1:
            sampler: torch.utils.data.Sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed
            )
            sampler.set_epoch(epoch)
        else:
            generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=config.workers,
            pin_memory=device.type == "cuda",
        )
        train_model.train()
        bar = progress(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}")
        losses = []
        for step_in_epoch, (images, targets) in enumerate(loader):
            step = epoch * steps_per_epoch + step_in_epoch
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(config.lr, step, total_steps, config.poly_power)
            images = images.to(device, non_blocking=True)  # (B, 3, S, S)
            targets = targets.to(device, non_blocking=True)  # (B, S, S)
            with autocast:
                logits = train_model(images)  # (B, K, S, S)
            loss = masked_cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            value = loss.detach()
            if world > 1:
                torch.distributed.all_reduce(value)
                value = value / world
            losses.append(float(value))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        history.step_loss.extend(losses)
        history.epoch_loss.append(sum(losses) / max(len(losses), 1))
        if on_epoch_end is not None:
            on_epoch_end(
                {
                    "epoch": epoch + 1,
                    # copies: the dict must not change when training goes on
                    "model": copy.deepcopy(unwrap(model).state_dict()),
                    "optimizer": copy.deepcopy(optimizer.state_dict()),
                    "scaler": scaler.state_dict(),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    },
                    "history": {
                        "epoch_loss": list(history.epoch_loss),
                        "step_loss": list(history.step_loss),
                    },
                }
            )
    model.eval()
    return history
