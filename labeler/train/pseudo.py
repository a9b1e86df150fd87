"""Pseudo-masks from cached attention maps: the segmenter's final map, CRF, uncertain pixels.

``probs_from_maps`` rebuilds exactly what ``StableSeg`` computes from its layer maps, with the
segmenter's own functions (CAPM = weighted sum of cross maps, SAPM = weighted sum of self maps,
final = CAPM + SAPM at the common size: :func:`labeler.sar.final_scores`; then bilinear to the
image, normalised), so stage 1 only caches the per-layer maps and StableSeg++ regenerates
pseudo-masks with new weights without running the UNet again.

The self maps in the cache were computed with the CA map of the uniform weights; with learned
weights the real segmenter seeds SAR with its own CA map, so masks rebuilt from the cache with
learned weights only approximate what ``StableSeg`` with those weights gives. The refine job
therefore runs StableSeg again for StableSeg++ by default (``--plusplus-masks exact``) and uses
:func:`mask_from_maps` to count how many pixels the cache shortcut would have changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..background import background_first, layers_evidence, probs_to_mask
from ..crf import dense_crf
from ..result import IGNORE, MAX_LABELS, share_key
from ..sar import cross_attention_map, final_scores, normalise
from .trainer_settings import PseudoConfig


def _tensors(layer_maps: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.asarray(m)).float()[None] for name, m in layer_maps.items()}


def scores_from_maps(
    layer_maps: Mapping[str, np.ndarray],
    cross_weights: Mapping[str, float],
    self_weights: Mapping[str, float],
    common_size: tuple[int, int],
    self_only: bool = False,
) -> torch.Tensor:
    """(C, S, S) un-normalised final scores at the common size from layer -> (C, h, w) maps."""
    maps = _tensors(layer_maps)
    capm = cross_attention_map(maps, cross_weights, common_size)  # (1, C, S, S)
    return final_scores(capm, maps, self_weights, common_size, self_only)[0]


def evidence_from_maps(
    layer_maps: Mapping[str, np.ndarray],
    cross_weights: Mapping[str, float],
    common_size: tuple[int, int],
    num_labels: int,
) -> torch.Tensor:
    """(labels, S, S) the labels' evidence (:mod:`labeler.background`) from cached maps: each
    cross layer's class map times its label share is the attention the labels got."""
    attention = {}
    for name, weight in cross_weights.items():
        if not weight:
            continue
        if share_key(name) not in layer_maps:
            raise ValueError(
                f"the cache has no label share for {name}: it was written by an older version; "
                "start a new work dir"
            )
        class_map = torch.from_numpy(np.asarray(layer_maps[name])).float()  # (C, h, w)
        share = torch.from_numpy(np.asarray(layer_maps[share_key(name)])).float()  # (1, h, w)
        attention[name] = (class_map * share)[None]  # (1, C, h, w)
    return layers_evidence(attention, cross_weights, common_size, num_labels)[0]


def _upsample(maps: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """(C, S, S) -> (C, H, W) bilinear, ``out_size`` = (width, height)."""
    width, height = out_size
    return F.interpolate(maps[None], size=(height, width), mode="bilinear", align_corners=False)[0]


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
    return normalise(_upsample(scores, out_size), dim=0).numpy().astype(np.float32)


@dataclass
class CachedFinal:
    """StableSeg's final map rebuilt from cached layer maps at an output size.

    Attributes:
        probs: (C', H, W) float32 normalised over every prompted class (the background
            prompt's channel last when there is one).
        evidence: (labels, H, W) float32 every label's evidence, with a background threshold.
    """

    probs: np.ndarray
    evidence: np.ndarray | None = None

    def mask(self, background_channel: bool, threshold: float | None) -> np.ndarray:
        """(H, W) uint8 the segmenter's mask of these maps (no CRF)."""
        evidence = None if self.evidence is None else torch.from_numpy(self.evidence)
        mask = probs_to_mask(torch.from_numpy(self.probs), background_channel, evidence, threshold)
        return mask.numpy().astype(np.uint8)

    def winner_evidence(self, num_labels: int) -> np.ndarray | None:
        """(H, W) the evidence of each pixel's best label, or None."""
        if self.evidence is None:
            return None
        best = self.probs[:num_labels].argmax(axis=0)  # (H, W)
        return np.take_along_axis(self.evidence, best[None], axis=0)[0]


def final_from_maps(
    layer_maps: Mapping[str, np.ndarray],
    weights: tuple[Mapping[str, float], Mapping[str, float]],
    common_size: tuple[int, int],
    out_size: tuple[int, int],
    num_labels: int,
    background_threshold: float | None = None,
    self_only: bool = False,
) -> CachedFinal:
    """The final probabilities (and with a threshold the labels' evidence) at ``out_size``."""
    cross, selfs = weights
    probs = probs_from_maps(layer_maps, cross, selfs, common_size, out_size, self_only)
    evidence = None
    if background_threshold is not None:
        small = evidence_from_maps(layer_maps, cross, common_size, num_labels)  # (labels, S, S)
        evidence = _upsample(small, out_size).numpy().astype(np.float32)
    return CachedFinal(probs, evidence)


def mask_from_maps(
    layer_maps: Mapping[str, np.ndarray],
    weights: tuple[Mapping[str, float], Mapping[str, float]],
    common_size: tuple[int, int],
    out_size: tuple[int, int],
    num_labels: int,
    background_threshold: float | None = None,
    self_only: bool = False,
    background_channel: bool = False,
) -> np.ndarray:
    """(H, W) uint8 StableSeg mask at ``out_size`` = (width, height) from cached layer maps and
    (cross, self) layer weights: the segmenter's argmax with its background rules, no CRF."""
    final = final_from_maps(
        layer_maps, weights, common_size, out_size, num_labels, background_threshold, self_only
    )
    return final.mask(background_channel, background_threshold)


def pseudo_mask(
    rgb: np.ndarray,
    probs: np.ndarray,
    config: PseudoConfig,
    background_threshold: float | None = None,
    background_channel: bool = False,
    evidence: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W) uint8 training mask from (C', H, W) probabilities over an (H, W, 3) image.

    Ids follow the project's convention: k = ``labels[k - 1]``, 0 = background (by the rules of
    :mod:`labeler.background`: ``background_channel`` says the last channel is the background
    prompt's; a threshold needs ``evidence``, the (H, W) evidence of each pixel's best label),
    255 = uncertain (best refined probability below ``config.threshold``), left out of training.
    CRF sees background as a class (:func:`labeler.background.background_first`).
    """
    labels = probs[:-1] if background_channel else probs  # (C, H, W)
    if labels.shape[0] > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels fit a uint8 mask, got {labels.shape[0]}")
    if background_channel or background_threshold is not None:
        prompt = probs[-1] if background_channel else None
        class_probs = background_first(labels, prompt, evidence, background_threshold)
        first_id = 0
    else:
        class_probs, first_id = probs, 1
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
    num_labels: int,
    background_threshold: float | None = None,
    self_only: bool = False,
    background_channel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's masks from its cached maps and (cross, self) layer weights.

    Returns:
        (StableSeg mask, training pseudo-mask), both (H, W) uint8 at the size of ``rgb``
        (H, W, 3): the first is the segmenter's argmax (with its background rules), the second
        :func:`pseudo_mask` of the same probabilities (CRF, 255 = uncertain).
    """
    size = (rgb.shape[1], rgb.shape[0])
    final = final_from_maps(
        layer_maps, weights, common_size, size, num_labels, background_threshold, self_only
    )
    raw = final.mask(background_channel, background_threshold)
    pseudo = pseudo_mask(
        rgb,
        final.probs,
        config,
        background_threshold,
        background_channel,
        final.winner_evidence(num_labels),
    )
    return raw, pseudo
