"""Which pixels are background (0): the one place for the rules, and the distribution CRF takes.

Two rules, alone or together:

* **A background prompt** (``SegmenterConfig.background_prompt``, e.g. ``"background"``) is one
  more class of the prompt, the last channel of the final map: the pixels it wins are 0.
* **A threshold** (``SegmenterConfig.background_threshold`` = t) on the winning label's
  *evidence*: the label's cross-attention at the pixel relative to its strongest cross-attention
  anywhere in the image, ``E_c(x) = A_c(x) / max_y A_c(y)`` in [0, 1], where ``A_c`` is the
  weighted sum over the chosen cross-attention layers of the attention the label's tokens get
  before it is renormalised over the labels. A pixel is 0 when ``E_k(x) < t`` for its label k.

Why this threshold: the final probabilities are a distribution over the given labels, so their
best value is 1 for a single label and about 1/C for C labels; a threshold on them means
something different for every label list (with one label nothing is ever background). The
evidence compares each label with itself: "this pixel gets less than t of the attention the
label gets where it is strongest", the same question for one label or 150, and it does not depend
on how much attention the prompt's other tokens draw. 0.3-0.5 are useful values.

For CRF (``pseudo-label --crf``, the StableSeg+ pseudo-masks) :func:`background_first` turns the
labels' probabilities and the rules into a (1 + C) distribution, background first, whose argmax is
exactly the mask of the rules, so CRF refines the background like any other class.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .sar import EPS, weighted_sum


def label_evidence(attention: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) cross-attention of the labels (not renormalised) -> each label's evidence,
    its attention over its own maximum in the image, in [0, 1]."""
    peak = attention.flatten(2).amax(dim=2).clamp(min=EPS)  # (B, C)
    return attention / peak[:, :, None, None]


def layers_evidence(
    attention: Mapping[str, torch.Tensor],
    cross_weights: Mapping[str, float],
    size: tuple[int, int],
    num_labels: int,
) -> torch.Tensor:
    """Every label's evidence at the common size from the cross layers' label attention.

    ``A_c`` is the weighted sum of the layers' attention (before it is renormalised over the
    labels), bilinear to ``size``; the evidence is :func:`label_evidence` of it.

    Args:
        attention: cross layer -> (B, C', h, w) the attention each prompted class got.
        cross_weights: cross layer -> weight; layers missing or with weight 0 are skipped.
        size: the common size (S, S).
        num_labels: the first ``num_labels`` classes are the labels (a background prompt's
            channel, last, has no evidence).

    Returns:
        (B, num_labels, S, S) evidence in [0, 1].
    """
    total = weighted_sum(attention, cross_weights, size)  # (B, C', S, S)
    if total is None:
        raise ValueError(
            f"no cross-attention map has weight: layers {sorted(attention)[:5]}, "
            f"weights {dict(list(cross_weights.items())[:5])}"
        )
    return label_evidence(total[:, :num_labels])


def winner_to_mask(
    index: torch.Tensor,
    num_channels: int,
    background_channel: bool = False,
    evidence: torch.Tensor | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """(...) winning channel (0-based) -> mask ids: k + 1, or 0 where a rule says background.

    Args:
        index: the argmax channel of the final map at each pixel.
        num_channels: the final map's channels (with ``background_channel``: the labels and,
            last, the background prompt's).
        evidence: (...) the winning label's evidence at each pixel (:func:`label_evidence`),
            needed with a threshold.
        threshold: pixels whose evidence is below it become 0; None: no threshold.
    """
    mask = index + 1
    if background_channel:
        mask = torch.where(index == num_channels - 1, torch.zeros_like(mask), mask)
    if threshold is not None:
        if evidence is None:
            raise ValueError("a background threshold needs the winning labels' evidence")
        mask = torch.where(evidence < threshold, torch.zeros_like(mask), mask)
    return mask


def probs_to_mask(
    probs: torch.Tensor,
    background_channel: bool = False,
    evidence: torch.Tensor | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """(C', H, W) final probabilities -> (H, W) mask by the rules above.

    ``evidence`` is (C, H, W), every label's evidence (the winner's is gathered here).
    """
    index = probs.argmax(dim=0)  # (H, W)
    winner = None
    if threshold is not None:
        if evidence is None:
            raise ValueError("a background threshold needs the labels' evidence")
        labels = evidence.shape[0]
        winner = evidence.gather(0, index.clamp(max=labels - 1)[None])[0]  # (H, W)
    return winner_to_mask(index, probs.shape[0], background_channel, winner, threshold)


def background_first(
    probs: np.ndarray,
    background: np.ndarray | None = None,
    evidence: np.ndarray | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """A (1 + C, H, W) distribution, background first, whose argmax is the mask of the rules.

    Args:
        probs: (C, H, W) the labels' probabilities (with a background prompt: their share, so
            that ``background + probs.sum(0) == 1``).
        background: (H, W) the background prompt's probability, or None.
        evidence: (H, W) the winning label's evidence, needed with a threshold.
        threshold: the background threshold, or None.

    The labels' channels are ``s * P_c`` and background's ``max(t, s * P_bg)``, with
    ``s = E_k / P_k`` (1 without a threshold): without a threshold this is the prompt's own
    distribution; with one, the winning label's channel becomes its evidence ``E_k``, which loses
    to background exactly where ``E_k < t``, and the other labels keep their ratios to it.
    """
    probs = np.asarray(probs, dtype=np.float32)
    prompt = (
        np.zeros(probs.shape[1:], np.float32)
        if background is None
        else np.asarray(background, np.float32)
    )
    if threshold is None:
        scale = np.ones(probs.shape[1:], np.float32)
        floor = 0.0
    else:
        if evidence is None:
            raise ValueError("a background threshold needs the winning labels' evidence")
        best = np.maximum(probs.max(axis=0), EPS)  # (H, W)
        scale = np.asarray(evidence, np.float32) / best
        floor = float(threshold)
    labels = probs * scale[None]  # (C, H, W)
    first = np.maximum(prompt * scale, floor)[None]  # (1, H, W)
    extended = np.concatenate([first, labels]).astype(np.float32)  # (1 + C, H, W)
    return extended / np.maximum(extended.sum(axis=0, keepdims=True), EPS)
