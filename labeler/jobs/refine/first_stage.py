"""The first stage of every refine run: StableSeg masks of the pool and the attention cache.

With per-image labels (``RefineRun.subset``) an image is prompted with its own labels only: its
cache entry holds those channels and names their global ids, and its mask is written in global
ids (``labeler.subsets.LabelSubset``). An image that cannot be used is skipped:
``W/cache/<key>.skip`` says why, and the report lists it.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from labeler.images import open_image

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, image_input
from ..stage import Loaded, Segmented, segment_stream
from .files import PoolItem, write_mask
from .workdir import CACHE, PLAN_FILE

if TYPE_CHECKING:
    from .workdir import RefineRun

log = logging.getLogger(__name__)


class NoLabelsError(ValueError):
    """A pool image the run has no labels for (it is skipped); the message says why."""


def skip(run: RefineRun, item: Any, reason: str) -> None:
    """Leave a pool image out of the run, saying why (``W/cache/<key>.skip``, the report)."""
    log.warning("skipping %s: %s", item.path, reason)
    atomic_write_text(run.out(CACHE, item, ".skip"), reason)


def stableseg(run: RefineRun) -> dict[str, Any]:
    """StableSeg masks of every pool image, and every attention layer's class map (the cache).

    Images go through the model stage (:func:`labeler.jobs.stage.segment_stream`: read in
    threads, full batches). With per-image labels each image is prompted with its own labels
    (images sharing a label set share a batch); its cache entry holds maps for those labels
    only, and names their global ids (``label_ids`` in the header). Its mask is written in
    global ids. An image that cannot be read or segmented is skipped with the reason.
    """
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
    if todo and segmenter is not None:
        segmented = segment_stream(
            todo,
            partial(_read, run),
            segmenter,
            run.labels,
            workers=run.readers,
            return_layer_maps=True,
        )
        for done in segmented:
            if done.error is None:
                _write(run, done)
            else:
                skip(run, done.key, done.error)
            bar.update(1)
    bar.close()
    return {}


def _read(run: RefineRun, item: PoolItem) -> Loaded:
    """One pool image for the stage (in a reading thread): its labels, then its pixels.

    Raises:
        NoLabelsError: the run has no labels for it.
        ImageError: it cannot be read.
    """
    subset = run.subset(item)
    if isinstance(subset, str):
        raise NoLabelsError(subset)
    image = open_image(image_input(item.path))  # a local file, or an object's bytes
    return Loaded(image, subset.ids, extra=image.size)


def _write(run: RefineRun, done: Segmented[PoolItem]) -> None:
    """One image's StableSeg mask (global ids) and cache entry (its labels' maps, at the
    image's size ``done.extra``); an earlier attempt's ``.skip`` goes."""
    from labeler.train.cache import maps_to_bytes

    item, subset = done.key, done.subset
    assert done.mask is not None and subset is not None
    write_mask(run.out("stableseg/masks", item), done.mask)
    data = maps_to_bytes(
        done.result.layer_maps or {},
        subset.names(run.labels),
        done.extra,
        extra={"label_ids": list(subset.ids)},
    )
    atomic_write_bytes(run.out(CACHE, item, ".safetensors"), data)
    run.out(CACHE, item, ".skip").unlink(missing_ok=True)


def stableseg_finish(run: RefineRun, record: dict[str, Any]) -> None:
    skipped = [i for i in run.pool if run.out(CACHE, i, ".skip").exists()]
    record["images"] = len(run.usable)
    record["skipped"] = {
        str(i.path): run.out(CACHE, i, ".skip").read_text(encoding="utf-8") for i in skipped
    }
    if len(run.usable) < 2:
        raise ValueError(f"only {len(run.usable)} readable image(s) in the pool; need >= 2")
