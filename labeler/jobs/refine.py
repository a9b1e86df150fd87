"""The refine job: StableSeg pseudo-masks -> StableSeg+ -> StableSeg++ on an unlabelled pool.

Layout of the work dir W (every file written atomically; a step is done once state.json says
so, and a per-image step skips images whose output already exists):

    run.json                      settings and pool of the run (a rerun must match them)
    plan.json                     the segmenter's layers, uniform weights and common size
    state.json                    finished steps with their times, losses and metrics
    cache/<key>.safetensors       every attention layer's class map, fp16 (stage 1)
    stableseg/masks/<key>.png     StableSeg masks (0 background, k = k-th label)
    plus/pseudo/<key>.png         CRF-cleaned pseudo-masks, 255 = uncertain (ignored)
    plus/checkpoint.pt            the student after the last finished epoch (while training)
    plus/student/                 DeepLabV3+ (smp save_pretrained + stableseg_student.json)
    plus/pred/<key>.png           the student's predictions on the pool
    plusplus/weights.safetensors  learned per-layer weights (+ weights.json)
    plusplus/stableseg/<key>.png  StableSeg masks with the learned weights (from the cache)
    plusplus/pseudo, checkpoint.pt, student/, pred/   as for plus
    report.json, report.png       what ran, times, loss curves, weights, mIoU (--val-gt)

Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) the per-image steps are split over
the processes, training runs DistributedDataParallel, and process 0 writes the shared files.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from labeler.train.config import DTYPES, STAGES, RefineOptions

from .distributed import Distributed
from .io import (
    ImageError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    open_image,
    remove_stale_temporaries,
)
from .pseudo_label import quiet_model_loading
from .refine_files import (
    PoolItem,
    RefineMismatchError,
    check_work_dir,
    load_pair,
    load_rgb,
    pool_from_folder,
    read_json,
    read_mask,
    write_mask,
)

log = logging.getLogger(__name__)


__all__ = [
    "PoolItem",
    "RefineMismatchError",
    "RefineOptions",
    "RefineResult",
    "pool_from_folder",
    "run_refine",
]


@dataclass
class RefineResult:
    """Where a run's products are; ``already_done`` when the rerun had nothing left to do."""

    work_dir: Path
    report: dict[str, Any]
    already_done: bool = False
    is_main: bool = True

    @property
    def students(self) -> dict[str, Path]:
        stages = self.report.get("stages", {})
        return {s: self.work_dir / s / "student" for s in STAGES if s in stages}

    @property
    def weights_path(self) -> Path | None:
        path = self.work_dir / "plusplus" / "weights.safetensors"
        return path if path.exists() else None


def _setup_distributed(device: str | None) -> tuple[Distributed, bool]:
    """Join the launcher's process group (NCCL on CUDA, else gloo). (info, we created it)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local % torch.cuda.device_count())
            backend = "nccl"
        dist.init_process_group(backend, timeout=timedelta(hours=48))
        created = True
    return Distributed.from_environment(), created


# ---------------------------------------------------------------------------- the run
class _Run:
    """One refine run in one process: paths, state, and the steps."""

    def __init__(
        self,
        pool: list[PoolItem],
        work_dir: Path,
        options: RefineOptions,
        dist: Distributed,
        on_event: Callable[[str], None] | None,
    ) -> None:
        import torch

        self.pool, self.work, self.options, self.dist = pool, work_dir, options, dist
        self.on_event = on_event or (lambda name: None)
        self.labels = list(options.labels)
        device = torch.device(
            options.device or dist.device() or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if device.type == "cuda" and device.index is None:  # DDP wants the index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.state: dict[str, Any] = read_json(work_dir / "state.json", {"steps": {}})

    # -- paths and bookkeeping
    def out(self, folder: str, item: PoolItem, suffix: str = ".png") -> Path:
        return self.work / folder / f"{item.key}{suffix}"

    def mine(self, items: Sequence[PoolItem]) -> list[PoolItem]:
        return list(items[self.dist.rank :: self.dist.world_size])

    @property
    def usable(self) -> list[PoolItem]:
        """Pool images with a cache entry (the unreadable ones are skipped)."""
        return [i for i in self.pool if self.out("cache", i, ".safetensors").exists()]

    def bar(self, total: int, desc: str, unit: str = "img", leave: bool = True) -> Any:
        from tqdm.auto import tqdm

        show = self.options.progress and self.dist.is_main
        return tqdm(
            total=total, desc=desc, file=sys.stderr, disable=not show, leave=leave, unit=unit
        )

    def done(self, step: str) -> bool:
        return step in self.state["steps"]

    def plan(self) -> dict[str, Any]:
        plan = read_json(self.work / "plan.json")
        if plan is None:
            raise RuntimeError(f"{self.work}/plan.json is missing; delete the work dir and rerun")
        return plan

    # -- steps
    def step_stableseg(self) -> dict[str, Any]:
        import torch

        from labeler import StableSeg
        from labeler.train.cache import maps_to_bytes

        # Images skipped by an earlier, unfinished attempt are tried again (the file may have
        # been fixed, or the read failed for a passing reason); once the step is done, final.
        todo = [
            item
            for item in self.mine(self.pool)
            if not self.out("cache", item, ".safetensors").exists()
        ]
        segmenter = None
        if todo or (self.dist.is_main and not (self.work / "plan.json").exists()):
            quiet_model_loading()
            dtype = DTYPES[self.options.dtype]
            segmenter = StableSeg.from_pretrained(
                self.options.model,
                device=self.device,
                dtype=getattr(torch, dtype) if dtype else None,
                config=self.options.segmenter,
            )
            if self.dist.is_main:
                plan = segmenter.plan()
                record = {
                    "cross": plan.cross,
                    "self": plan.self_,
                    "common_size": list(plan.common_size),
                    "self_only": self.options.segmenter.self_only,
                }
                atomic_write_json(self.work / "plan.json", record, indent=2)
        bar = self.bar(len(todo), "stage 1/3 StableSeg + attention cache")
        chunk_size = 2 * self.options.segmenter.batch_size
        for start in range(0, len(todo), chunk_size):
            images, good = [], []
            for item in todo[start : start + chunk_size]:
                try:
                    images.append(open_image(item.path))
                    good.append(item)
                except ImageError as err:
                    log.warning("skipping %s: %s", item.path, err)
                    atomic_write_text(self.out("cache", item, ".skip"), str(err))
            if good:
                assert segmenter is not None
                results = segmenter.iter_segment(images, self.labels, return_layer_maps=True)
                for item, image, result in zip(good, images, results, strict=True):
                    write_mask(self.out("stableseg/masks", item), result.mask)
                    data = maps_to_bytes(result.layer_maps or {}, self.labels, image.size)
                    atomic_write_bytes(self.out("cache", item, ".safetensors"), data)
                    self.out("cache", item, ".skip").unlink(missing_ok=True)
            bar.update(len(todo[start : start + chunk_size]))
        bar.close()
        return {}

    def after_stableseg(self, record: dict[str, Any]) -> None:
        skipped = [i for i in self.pool if self.out("cache", i, ".skip").exists()]
        record["images"] = len(self.usable)
        record["skipped"] = {
            str(i.path): self.out("cache", i, ".skip").read_text(encoding="utf-8") for i in skipped
        }
        self.score("stableseg", record)
        if len(self.usable) < 2:
            raise ValueError(f"only {len(self.usable)} readable image(s) in the pool; need >= 2")

    def weights_for(self, stage: str) -> tuple[dict[str, float], dict[str, float]]:
        """(cross, self) layer weights: the uniform plan (plus) or the learned ones."""
        plan = self.plan()
        if stage == "plus":
            return plan["cross"], plan["self"]
        from labeler.weights import load_map_weights

        learned = load_map_weights(self.work / "plusplus" / "weights.safetensors")
        return (
            {n: learned.get(n, 0.0) for n in plan["cross"]},
            {n: learned.get(n, 0.0) for n in plan["self"]},
        )

    def step_pseudo(self, stage: str) -> dict[str, Any]:
        from labeler.train.cache import maps_from_bytes
        from labeler.train.pseudo import masks_from_cache

        plan = self.plan()
        cross, selfs = self.weights_for(stage)
        todo = [i for i in self.mine(self.usable) if not self.out(f"{stage}/pseudo", i).exists()]
        bar = self.bar(len(todo), f"{stage}: {'CRF ' * self.options.pseudo.crf}pseudo-masks")
        for item in todo:
            maps, _ = maps_from_bytes(self.out("cache", item, ".safetensors").read_bytes())
            rgb = load_rgb(item.path, self.options.pseudo.max_side)
            raw, mask = masks_from_cache(
                maps,
                rgb,
                (cross, selfs),
                tuple(plan["common_size"]),
                self.options.pseudo,
                self.options.segmenter.background_threshold,
                plan["self_only"],
                background_channel=self.options.segmenter.background_prompt is not None,
            )
            if stage == "plusplus":
                write_mask(self.out("plusplus/stableseg", item), raw)
            write_mask(self.out(f"{stage}/pseudo", item), mask)
            bar.update(1)
        bar.close()
        return {}

    def after_pseudo(self, stage: str, record: dict[str, Any]) -> None:
        ignored = total = 0
        for item in self.usable:
            mask = read_mask(self.out(f"{stage}/pseudo", item))
            ignored += int((mask == 255).sum())
            total += mask.size
        record["ignored_fraction"] = ignored / max(total, 1)
        self.score(f"{stage}.pseudo", record)

    def step_train(self, stage: str) -> dict[str, Any]:
        import io

        import torch

        from labeler.train.data import PseudoMaskDataset
        from labeler.train.loop import train_student
        from labeler.train.model import STUDENT_META_FILE, build_student, student_metadata

        config = self.options.student
        checkpoint = self.work / stage / "checkpoint.pt"
        resume = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else None
        max_side = self.options.pseudo.max_side
        sources = [
            partial(load_pair, item.path, self.out(f"{stage}/pseudo", item), max_side)
            for item in self.usable
        ]
        dataset = PseudoMaskDataset(
            sources, config.image_size, config.scale_range, config.flip, config.seed
        )
        weights = None if resume is not None else config.encoder_weights
        model = build_student(config.encoder, weights, len(self.labels), seed=config.seed)

        def on_epoch_end(state: dict[str, Any]) -> None:
            if self.dist.is_main:
                buffer = io.BytesIO()
                torch.save(state, buffer)
                atomic_write_bytes(checkpoint, buffer.getvalue())
            self.on_event(f"{stage}.train.epoch{state['epoch']}")

        started = len(resume["history"]["epoch_loss"]) if resume else 0
        if self.dist.is_main:
            log.info(
                "%s: training %s from epoch %d of %d", stage, config.encoder, started, config.epochs
            )
        history = train_student(
            model,
            dataset,
            config,
            self.device,
            resume=resume,
            on_epoch_end=on_epoch_end,
            progress=lambda total, desc: self.bar(total, f"{stage}: {desc}", "step", leave=False),
        )
        if self.dist.is_main:
            folder, temporary = self.work / stage / "student", self.work / stage / ".student.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            model.to("cpu").save_pretrained(str(temporary))
            meta = student_metadata(
                self.labels, self.options.background, config.image_size, config.encoder
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

    def step_predict(self, stage: str) -> dict[str, Any]:
        from labeler.train.student import load_student, logits_to_mask, predict_logits

        student = load_student(self.work / stage / "student", device=self.device)
        todo = [i for i in self.mine(self.usable) if not self.out(f"{stage}/pred", i).exists()]
        bar = self.bar(len(todo), f"{stage}: student predictions")
        for item in todo:
            rgb = load_rgb(item.path, self.options.pseudo.max_side)
            logits = predict_logits(student.model, rgb, student.image_size, self.device)
            mask = logits_to_mask(logits, student.background).cpu().numpy().astype(np.uint8)
            write_mask(self.out(f"{stage}/pred", item), mask)
            bar.update(1)
        bar.close()
        return {}

    def step_fit(self) -> dict[str, Any]:
        from labeler.train.cache import maps_from_bytes
        from labeler.train.mapweights import PixelSampler, fit_map_weights, weights_summary
        from labeler.weights import map_weights_to_bytes

        if not self.dist.is_main:
            return {}
        plan, config = self.plan(), self.options.map_fit
        initial = {**plan["cross"]}
        if any(plan["self"].values()):  # SAR on: its layers are weighted too
            initial.update(plan["self"])
        # With a background prompt its map is the last channel, and background pixels are fitted.
        background = len(self.labels) if self.options.segmenter.background_prompt else None
        sampler = PixelSampler(
            list(initial), tuple(plan["common_size"]), config, len(self.usable), background
        )
        bar = self.bar(len(self.usable), "plusplus: sampling cached maps")
        for item in self.usable:
            maps, _ = maps_from_bytes(self.out("cache", item, ".safetensors").read_bytes())
            sampler.add(maps, read_mask(self.out("plus/pred", item)))
            bar.update(1)
        bar.close()
        features, labels = sampler.samples()
        bar = self.bar(config.steps, "plusplus: fitting map weights", "step")
        fit = fit_map_weights(
            features, labels, sampler.names, initial, config, lambda s, v: bar.update()
        )
        bar.close()
        segmenter = self.options.segmenter
        metadata = {
            "labels": self.labels,
            "model": self.options.model,
            "segmenter": {
                "image_size": segmenter.image_size,
                "timestep": segmenter.timestep,
                "background_threshold": segmenter.background_threshold,
                "background_prompt": segmenter.background_prompt,
            },
            "initial_loss": fit.initial_loss,
            "final_loss": fit.final_loss,
        }
        folder = self.work / "plusplus"
        weights = map_weights_to_bytes(fit.weights, metadata)
        atomic_write_bytes(folder / "weights.safetensors", weights)
        summary = weights_summary(fit, plan["cross"], plan["self"], metadata)
        atomic_write_json(folder / "weights.json", summary, indent=2)
        return {
            "steps": config.steps,
            "pixels": fit.pixels,
            "loss": fit.loss,
            "initial_loss": fit.initial_loss,
            "final_loss": fit.final_loss,
            "weights": fit.weights,
            "initial_weights": fit.initial,
        }

    def after_predict(self, stage: str, record: dict[str, Any]) -> None:
        self.score(f"{stage}.predict", record)

    # -- evaluation
    def score(self, step: str, record: dict[str, Any]) -> None:
        """Set the step record's mIoU against --val-gt (None without it) for each of its masks."""
        record["metrics"] = {name: self.evaluate(folder) for name, folder in _scored(step).items()}
        record["val_gt"] = None if self.options.val_gt is None else str(self.options.val_gt)

    def rescore(self) -> None:
        """Score the finished steps that ran without this --val-gt; rewrite state and report."""
        steps = _unscored(self.state, self.options.val_gt)
        if not steps or not self.dist.is_main:
            return
        for step in steps:
            log.info("scoring %s against %s", step, self.options.val_gt)
            self.score(step, self.state["steps"][step])
        atomic_write_json(self.work / "state.json", self.state)
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

    # -- driving
    def run_step(self, step: str) -> None:
        stage, _, part = step.partition(".")
        if self.dist.is_main:
            log.info("step %s", step)
        started = time.monotonic()
        if step == "stableseg":
            record = self.step_stableseg()
        elif part == "fit":
            record = self.step_fit()
        else:
            record = getattr(self, f"step_{part}")(stage)
        self.dist.barrier()
        if self.dist.is_main:
            if step == "stableseg":
                self.after_stableseg(record)
            elif part in ("pseudo", "predict"):
                getattr(self, f"after_{part}")(stage, record)
            record["seconds"] = round(time.monotonic() - started, 3)
            record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.state["steps"][step] = record
            atomic_write_json(self.work / "state.json", self.state)
            checkpoint = self.work / stage / "checkpoint.pt"
            if part == "train" and checkpoint.exists():
                checkpoint.unlink()
            self.write_report()
        self.dist.barrier()
        self.state = read_json(self.work / "state.json", {"steps": {}})
        self.on_event(f"{step}.done")

    def write_report(self) -> dict[str, Any]:
        from labeler.train.report import assemble_report, render_report_png

        report = assemble_report(
            self.state["steps"],
            settings=self.options.settings(),
            stages=self.options.stages,
            finished=all(self.done(s) for s in self.options.steps()),
            pool_size=len(self.pool),
            background=self.options.background,
        )
        atomic_write_json(self.work / "report.json", report, indent=2)
        atomic_write_bytes(self.work / "report.png", render_report_png(report))
        return report


def _scored(step: str) -> dict[str, str]:
    """The masks a step's record scores against --val-gt: metric name -> folder in W."""
    stage, _, part = step.partition(".")
    if step == "stableseg":
        return {"stableseg": "stableseg/masks"}
    if part == "pseudo":
        extra = {"stableseg": "plusplus/stableseg"} if stage == "plusplus" else {}
        return {"pseudo_masks": f"{stage}/pseudo", **extra}
    if part == "predict":
        return {"student": f"{stage}/pred"}
    return {}


def _unscored(state: dict[str, Any], val_gt: str | os.PathLike[str] | None) -> list[str]:
    """Finished steps without metrics against ``val_gt`` (given after they ran)."""
    if val_gt is None:
        return []
    return [
        step
        for step, record in state["steps"].items()
        if _scored(step) and record.get("val_gt") != str(val_gt)
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
    state = read_json(work / "state.json", {"steps": {}})
    wanted = options.steps()
    finished = all(s in state["steps"] for s in wanted) and (work / "report.json").exists()
    if finished and not _unscored(state, options.val_gt):
        return RefineResult(work, read_json(work / "report.json"), already_done=True)
    needs_plus = "plusplus" in options.stages and "plus" not in options.stages
    if needs_plus and "plus.predict" not in state["steps"]:
        raise ValueError("stage plusplus needs the StableSeg+ predictions: add stage plus")

    dist, created = _setup_distributed(options.device)
    try:
        if dist.is_main:
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_json(work / "run.json", record, indent=2)
        dist.barrier()
        run = _Run(pool, work, options, dist, on_event)
        run.rescore()  # --val-gt given to a rerun: score what already ran (process 0 only)
        if any(s.endswith(".train") and not run.done(s) for s in wanted):
            _check_encoder(options, dist)  # fail before hours of stage 1, not after
        for step in wanted:
            if not run.done(step):
                run.run_step(step)
        report = run.write_report() if dist.is_main else {}
        if dist.is_main:  # every process is past its last write: left-overs of a killed run
            remove_stale_temporaries(work)
        dist.barrier()
        return RefineResult(work, report, already_done=finished, is_main=dist.is_main)
    finally:
        if created:
            import torch.distributed

            torch.distributed.destroy_process_group()
