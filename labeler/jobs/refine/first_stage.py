"""The first stage of every refine run: StableSeg masks of the pool and the attention cache.

With per-image labels (``RefineRun.subset``) an image is prompted with its own labels only: its
cache entry holds those channels and names their global ids, and its mask is written in global
ids (``labeler.subsets.LabelSubset``). An image that cannot be used is skipped: ``W/cache/<key>
.skip`` says why, and the report lists it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from labeler.images import ImageError, open_image
from labeler.subsets import segment_subsets

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .files import write_mask
from .workdir import CACHE, PLAN_FILE

if TYPE_CHECKING:
    from .workdir import RefineRun

log = logging.getLogger(__name__)


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
