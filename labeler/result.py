"""The typed result that `StableSeg.segment` returns for each image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BACKGROUND = 0
"""Mask id of background / unlabeled pixels."""
IGNORE = 255
"""Mask id of pixels left out of training and scoring."""
MAX_LABELS = 254
"""Labels that fit an 8-bit mask: ids 1..254 (0 is background, 255 ignore)."""


def mask_dtype(num_labels: int) -> type[np.unsignedinteger]:
    """uint8 for up to :data:`MAX_LABELS` labels, uint16 beyond (where 255 is a label)."""
    return np.uint8 if num_labels <= MAX_LABELS else np.uint16


SHARE_SUFFIX = "#share"


def share_key(layer: str) -> str:
    """The ``layer_maps`` key of a cross-attention layer's label share (see below)."""
    return layer + SHARE_SUFFIX


@dataclass
class SegmentationResult:
    """Masks and probabilities for one image, at the image's original size.

    Attributes:
        mask: (H, W) integer array: 0 = background / unlabeled, k = ``labels[k - 1]``,
            255 = ignore. uint8 for up to 254 labels; beyond that uint16, where 255 is a label
            (the segmenter never writes ignore; the exporters take at most 254 labels).
        probs: (C, H, W) float32 array, one map per label (sums to 1 over C at each pixel; with
            a background prompt, the labels' share only), or None: ``StableSeg.segment`` returns
            it only when asked (``return_probs=True``).
        labels: the label names, in the order given to ``segment``.
        scores: per-label confidence: the mean probability of that label over the pixels
            it wins (0.0 for a label that wins no pixel); the rule is
            :class:`labeler.scores.LabelScores`.
        layer_maps: only when asked for: attention layer name -> (C, h, w) float16 class map
            at the layer's own size (the StableSeg++ cache); for each cross-attention layer also
            :func:`share_key` -> (1, h, w), the share of its attention the labels got before
            renormalisation (class map x share = the labels' attention).
        background: with ``return_probs`` and a background prompt: (H, W) float32, the
            background prompt's probability (``background + probs.sum(0) == 1``).
        evidence: with ``return_probs`` and a background threshold: (H, W) float32, the
            winning label's evidence (:mod:`labeler.background`).
    """

    mask: np.ndarray
    probs: np.ndarray | None
    labels: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    layer_maps: dict[str, np.ndarray] | None = None
    background: np.ndarray | None = None
    evidence: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), the PIL convention."""
        return int(self.mask.shape[1]), int(self.mask.shape[0])

    def present_labels(self) -> list[int]:
        """1-based ids of the labels that own at least one pixel of the mask."""
        ids = np.unique(self.mask)
        return [int(i) for i in ids if 1 <= i <= len(self.labels)]
