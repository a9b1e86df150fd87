"""Pseudo-masks from cached attention maps: the segmenter's final map, CRF, uncertain pixels.

``probs_from_maps`` rebuilds exactly what ``StableSeg`` computes from its layer maps
(CAPM = weighted sum of cross maps, SAPM = weighted sum of self maps, final = CAPM + SAPM at the
common size, bilinear to the image, normalised), so stage 1 only caches the per-layer maps and
StableSeg++ regenerates pseudo-masks with new weights without running the UNet again.

The self maps in the cache were computed with the CA map of the uniform weights; with learned
weights the real segmenter seeds SAR with its own CA map, so masks rebuilt from the cache with
learned weights only approximate what ``StableSeg`` with those weights gives. The refine job
therefore runs StableSeg again for StableSeg++ by default (``--plusplus-masks exact``) and uses
:func:`mask_from_maps` to count how many pixels the cache shortcut would have changed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..crf import dense_crf
from ..result import IGNORE, MAX_LABELS
from ..sar import normalise, probs_to_mask, weighted_sum
from .config import PseudoConfig


def scores_from_maps(
    layer_maps: Mapping[str, np.ndarray],
    cross_weights: Mapping[str, float],
    self_weights: Mapping[str, float],
    common_size: tuple[int, int],
    self_only: bool = False,
) -> torch.Tensor:
    """(C, S, S) un-normalised final scores at the common size from layer -> (C, h, w) maps."""
    maps = {name: torch.from_numpy(np.asarray(m)).float()[None] for name, m in layer_maps.items()}
    capm = weighted_sum(maps, cross_weights, common_size)  # (1, C, S, S)
    if capm is None:
        raise ValueError("no cross-attention map has weight in these layer maps")
    sapm = weighted_sum(maps, self_weights, common_size)  # (1, C, S, S) or None
    if sapm is None:
        final = capm
    elif self_only:
        final = sapm
    else:
        final = capm + sapm
    return final[0]


def probs_from_maps(
    layer_maps: Mapping[str, np.ndarray],
    cross_weights: Mapping[str, float],
    self_weights: Mapping[str, float],
    common_size: tuple[int, int],
    out_size: tuple[int, int],
    self_only: bool = False,
) -> np.ndarray:
    """(C, H, W) float32 probabilities at ``out_size`` = (width, height), as StableSeg's."""
    scores = scores_from_maps(layer_maps, cross_weights, self_weights, common_size, self_only)
    width, height = out_size
    probs = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)
    probs = probs[0]  # (C, H, W)
    return normalise(probs, dim=0).numpy().astype(np.float32)


def mask_from_maps(
    layer_maps: Mapping[str, np.ndarray],
    weights: tuple[Mapping[str, float], Mapping[str, float]],
    common_size: tuple[int, int],
    out_size: tuple[int, int],
    background_threshold: float | None = None,
    self_only: bool = False,
    background_channel: bool = False,
) -> np.ndarray:
    """(H, W) uint8 StableSeg mask at ``out_size`` = (width, height) from cached layer maps and
    (cross, self) layer weights: the segmenter's argmax with its background rule, no CRF."""
    cross, selfs = weights
    probs = probs_from_maps(layer_maps, cross, selfs, common_size, out_size, self_only)
    mask = probs_to_mask(torch.from_numpy(probs), background_threshold, background_channel)
    return mask.numpy().astype(np.uint8)


def with_background(probs: np.ndarray, background_threshold: float) -> np.ndarray:
    """(C, H, W) -> (1 + C, H, W) with a constant background score, renormalised.

    Its argmax is 0 exactly where every label's probability is below the threshold, the
    segmenter's background rule, so CRF can move background boundaries like any other class.
    """
    background = np.full((1, *probs.shape[1:]), background_threshold, dtype=np.float32)
    extended = np.concatenate([background, probs.astype(np.float32)])  # (1 + C, H, W)
    return extended / extended.sum(axis=0, keepdims=True)


def pseudo_mask(
    rgb: np.ndarray,
    probs: np.ndarray,
    config: PseudoConfig,
    background_threshold: float | None = None,
    background_channel: bool = False,
) -> np.ndarray:
    """(H, W) uint8 training mask from (C, H, W) probabilities over an (H, W, 3) image.

    Ids follow the project's convention: k = ``labels[k - 1]``, 0 = background (with a
    background threshold, or ``background_channel``: the last channel is the background
    prompt's), 255 = uncertain (best refined probability below ``config.threshold``), left out
    of training.
    """
    if probs.shape[0] > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels fit a uint8 mask, got {probs.shape[0]}")
    if background_channel:
        background = probs[-1:]  # (1, H, W)
        if background_threshold is not None:
            labels_best = probs[:-1].max(axis=0, keepdims=True)
            background = np.where(labels_best < background_threshold, 1.0, background)
        class_probs = np.concatenate([background, probs[:-1]]).astype(np.float32)
        class_probs /= class_probs.sum(axis=0, keepdims=True)
        first_id = 0
    elif background_threshold is None:
        class_probs, first_id = probs, 1
    else:
        class_probs, first_id = with_background(probs, background_threshold), 0
    if config.crf:
        class_probs = dense_crf(rgb, class_probs, config.crf_config)  # (K, H, W)
    mask = (class_probs.argmax(axis=0) + first_id).astype(np.uint8)  # (H, W)
    threshold = config.threshold
    if threshold is not None:
        mask[class_probs.max(axis=0) < threshold] = IGNORE
    return mask


def masks_from_cache(
    layer_maps: Mapping[str, np.ndarray],
    rgb: np.ndarray,
    weights: tuple[Mapping[str, float], Mapping[str, float]],
    common_size: tuple[int, int],
    config: PseudoConfig,
    background_threshold: float | None = None,
    self_only: bool = False,
    background_channel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's masks from its cached maps and (cross, self) layer weights.

    Returns:
        (StableSeg mask, training pseudo-mask), both (H, W) uint8 at the size of ``rgb``
        (H, W, 3): the first is the segmenter's argmax (with its background rule), the second
        :func:`pseudo_mask` of the same probabilities (CRF, 255 = uncertain).
    """
    size = (rgb.shape[1], rgb.shape[0])
    cross, selfs = weights
    probs = probs_from_maps(layer_maps, cross, selfs, common_size, size, self_only)  # (C, H, W)
    raw = probs_to_mask(torch.from_numpy(probs), background_threshold, background_channel)
    pseudo = pseudo_mask(rgb, probs, config, background_threshold, background_channel)
    return raw.numpy().astype(np.uint8), pseudo
