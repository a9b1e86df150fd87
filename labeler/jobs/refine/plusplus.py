"""The StableSeg++ steps of a refine run: fitting the map weights, and its pseudo-masks.

By default (``--plusplus-masks exact``) the pseudo-masks come from running StableSeg with the
learned weights, the UNet again through the model stage, so SAR is seeded by the learned CA map
exactly as in ``pseudo-label --weights`` and ``serve --weights``; the step's record says how
many pixels the cache shortcut (``--plusplus-masks cache``: the learned weights applied to the
stage-1 maps, whose self-attention part was seeded by the uniform CA map) would have changed.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from labeler.images import open_image

from ..io import atomic_write_bytes, atomic_write_json, image_input
from ..stage import Loaded, Segmented, segment_stream
from .cached_maps import cached, pseudo, pseudo_finish, weights_for
from .files import PoolItem, read_mask, working_rgb, write_mask
from .workdir import WEIGHTS

if TYPE_CHECKING:
    from labeler.model_settings import SegmenterConfig

    from .workdir import RefineRun

log = logging.getLogger(__name__)


def fit(run: RefineRun) -> dict[str, Any]:
    """One weight per attention map, fitted so StableSeg matches the StableSeg+ predictions."""
    from labeler.train.mapweights import PixelSampler, fit_map_weights, weights_summary
    from labeler.weights import map_weights_to_bytes

    if not run.dist.is_main:
        return {}
    plan, config = run.plan(), run.options.map_fit
    initial = {**plan["cross"]}
    if any(plan["self"].values()):  # SAR on: its layers are weighted too
        initial.update(plan["self"])
    # With a background prompt its map is the last channel, and background pixels are fitted.
    background = len(run.labels) if run.options.segmenter.background_prompt else None
    sampler = PixelSampler(
        list(initial), tuple(plan["common_size"]), config, len(run.usable), background
    )
    bar = run.bar(len(run.usable), "plusplus: sampling cached maps")
    for item in run.usable:
        maps, subset = cached(run, item)
        sampler.add(maps, read_mask(run.out("plus/pred", item)), subset.ids)
        bar.update(1)
    bar.close()
    features, labels = sampler.samples()
    warning = sampler.background_only()
    if warning:
        log.warning(warning)
    bar = run.bar(config.steps, "plusplus: fitting map weights", "step")
    fit = fit_map_weights(
        features, labels, sampler.names, initial, config, lambda s, v: bar.update()
    )
    bar.close()
    segmenter = run.options.segmenter
    metadata = {
        "labels": run.labels,
        "model": run.options.model.source,
        "segmenter": {
            "image_size": segmenter.image_size,
            "timestep": segmenter.timestep,
            "background_threshold": segmenter.background_threshold,
            "background_prompt": segmenter.background_prompt,
        },
        "initial_loss": fit.initial_loss,
        "final_loss": fit.final_loss,
    }
    atomic_write_bytes(run.work / WEIGHTS, map_weights_to_bytes(fit.weights, metadata))
    summary = weights_summary(fit, plan["cross"], plan["self"], metadata)
    atomic_write_json(run.work / "plusplus" / "weights.json", summary, indent=2)
    return {
        "steps": config.steps,
        "pixels": fit.pixels,
        "loss": fit.loss,
        "initial_loss": fit.initial_loss,
        "final_loss": fit.final_loss,
        "weights": fit.weights,
        "initial_weights": fit.initial,
        **({"warning": warning} if warning else {}),
    }


def full_probs(result: Any) -> np.ndarray:
    """(C[+1], H, W) probabilities of a segmentation result, the background prompt's channel
    last when there is one (the segmenter returns it beside the labels' share)."""
    probs = result.probs  # (C, H, W)
    if result.background is not None:
        probs = np.concatenate([probs, result.background[None]])  # (C + 1, H, W)
    return probs.astype(np.float32)


def resize_maps(maps: np.ndarray, size: tuple[int, int], renormalise: bool) -> np.ndarray:
    """(C, H, W) -> (C, size[1], size[0]) bilinear, renormalised over C when asked."""
    import torch
    import torch.nn.functional as F

    from labeler.sar import normalise

    if (maps.shape[2], maps.shape[1]) == tuple(size):
        return maps
    scaled = F.interpolate(
        torch.from_numpy(maps)[None], size=(size[1], size[0]), mode="bilinear", align_corners=False
    )[0]  # (C, h, w)
    if renormalise:
        scaled = normalise(scaled, dim=0)
    return scaled.numpy().astype(np.float32)


def exact_pseudo(run: RefineRun) -> dict[str, Any]:
    """StableSeg++ masks by running StableSeg with the learned weights (the UNet again, through
    the model stage in full batches), so SAR is seeded by the learned CA map as in
    ``pseudo-label --weights``; then the pseudo-masks from its probabilities through CRF.

    Raises:
        ValueError: an image stage 1 read can no longer be read or segmented.
    """
    from labeler.weights import load_map_weights

    from ..models import load_stableseg

    todo = [i for i in run.mine(run.usable) if not run.out("plusplus/pseudo", i).exists()]
    if not todo:
        return {}
    config = run.options.segmenter.replace(map_weights=load_map_weights(run.work / WEIGHTS))
    segmenter = load_stableseg(run.options.model, config, str(run.device))
    bar = run.bar(len(todo), "plusplus: StableSeg with learned weights")
    segmented = segment_stream(
        todo, partial(_read, run), segmenter, run.labels, workers=run.readers, return_probs=True
    )
    for done in segmented:
        if done.error is not None:  # stage 1 read and segmented it: the file has changed
            raise ValueError(f"{done.key.path}: {done.error} (StableSeg++, exact pseudo-masks)")
        _write_exact(run, done, config)
        bar.update(1)
    bar.close()
    return {}


def _read(run: RefineRun, item: PoolItem) -> Loaded:
    """One usable pool image for the stage (in a reading thread): its labels and pixels, and
    the working RGB its CRF runs on (``extra``: (h, w, 3) uint8)."""
    subset = run.subset(item)
    if isinstance(subset, str):  # stage 1 cached it, so it has labels: the run changed
        raise ValueError(subset)
    image = open_image(image_input(item.path))
    rgb = working_rgb(image, run.options.pseudo.max_side)  # (h, w, 3)
    return Loaded(image, subset.ids, extra=rgb)


def _write_exact(run: RefineRun, done: Segmented[PoolItem], config: SegmenterConfig) -> None:
    """One image's StableSeg++ mask and, from its probabilities through CRF at the working
    size, its pseudo-mask (both in global ids)."""
    from labeler.train.pseudo import pseudo_mask

    item, result, subset, rgb = done.key, done.result, done.subset, done.extra
    assert done.mask is not None and subset is not None
    write_mask(run.out("plusplus/stableseg", item), done.mask)
    size = (rgb.shape[1], rgb.shape[0])
    probs = resize_maps(full_probs(result), size, renormalise=True)  # (C[+1], h, w)
    evidence = None
    if result.evidence is not None:
        evidence = resize_maps(result.evidence[None], size, renormalise=False)[0]  # (h, w)
    mask = pseudo_mask(
        rgb,
        probs,
        run.options.pseudo,
        config.background_threshold,
        background_channel=config.background_prompt is not None,
        evidence=evidence,
    )
    write_mask(run.out("plusplus/pseudo", item), subset.to_global(mask))


def plusplus_pseudo(run: RefineRun) -> dict[str, Any]:
    """StableSeg++ pseudo-masks, exact (StableSeg with the learned weights) or from the cache."""
    if run.options.plusplus_masks == "cache":
        return pseudo(run, "plusplus")
    return exact_pseudo(run)


def cache_disagreement(run: RefineRun) -> dict[str, Any]:
    """Pixels where the exact StableSeg++ masks and the cache shortcut's differ.

    The cache version (the learned weights applied to the stage-1 maps) is computed here,
    without CRF, at each exact mask's size, and compared in global ids.
    """
    from labeler.train.pseudo import mask_from_maps

    plan = run.plan()
    weights = weights_for(run, "plusplus")
    segmenter = run.options.segmenter
    per_image: dict[str, int] = {}
    pixels = 0
    for item in run.usable:
        exact = read_mask(run.out("plusplus/stableseg", item))  # (H, W)
        maps, subset = cached(run, item)
        shortcut = mask_from_maps(
            maps,
            weights,
            tuple(plan["common_size"]),
            (exact.shape[1], exact.shape[0]),
            len(subset),
            segmenter.background_threshold,
            plan["self_only"],
            background_channel=segmenter.background_prompt is not None,
        )
        per_image[item.key] = int((subset.to_global(shortcut) != exact).sum())
        pixels += exact.size
    differing = sum(per_image.values())
    return {
        "pixels": pixels,
        "differing_pixels": differing,
        "fraction": differing / max(pixels, 1),
        "images_differing": sum(1 for n in per_image.values() if n),
        "per_image": per_image,
    }


def plusplus_pseudo_finish(run: RefineRun, record: dict[str, Any]) -> None:
    """Counts of the pseudo-masks, which version they are, and (exact) the disagreement."""
    pseudo_finish(run, record, "plusplus")
    record["masks"] = run.options.plusplus_masks
    if run.options.plusplus_masks == "exact":
        record["cache_disagreement"] = cache_disagreement(run)
