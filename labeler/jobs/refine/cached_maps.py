"""The stage-1 cache read back: one image's layer maps, a stage's layer weights, and the
pseudo-masks made from them (StableSeg+, and StableSeg++ with ``--plusplus-masks cache``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from labeler.result import IGNORE
from labeler.subsets import LabelSubset

from .files import load_rgb, read_mask, write_mask
from .workdir import CACHE, WEIGHTS

if TYPE_CHECKING:
    from .workdir import RefineRun


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
