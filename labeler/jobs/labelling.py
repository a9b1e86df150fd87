"""The model step of ``pseudo-label``: a batch of read images -> masks and scores, on the
main thread.

With ``--labels-from-gt`` each image is prompted with the labels of its own ground truth: the
images of a batch that share a label set are segmented together, each set in its own call,
and their masks are mapped back to the run's global ids. An image without ground truth was
already refused by the reading stage: it is skipped alone, never its batch.

Full-resolution probabilities are asked of the segmenter only when the job needs them
(``--crf``); segmenters that return them anyway (before ``return_probs`` existed) have them
dropped here, so no writer holds them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labeler.result import BACKGROUND


@dataclass
class Labelled:
    """One image's labels, as the writers take them.

    Attributes:
        mask: (H, W) ids over the run's labels (0 background, k = k-th label, 255 ignore).
        scores: every label of the run -> confidence (0.0 for labels it was not prompted with).
        probs: (K, H, W) float32 probabilities of the prompted labels, only when asked for.
        prob_ids: (K,) the run's id of each channel of ``probs``.
    """

    mask: np.ndarray
    scores: dict[str, float]
    probs: np.ndarray | None = None
    prob_ids: list[int] = field(default_factory=list)


def _accepts_return_probs(model: Any) -> bool:
    """Whether ``model.segment`` takes ``return_probs`` (older segmenters always return them)."""
    try:
        parameters = inspect.signature(model.segment).parameters
    except (TypeError, ValueError):
        return False
    return "return_probs" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _segment(model: Any, images: list[Any], labels: Sequence[str], want_probs: bool) -> list[Any]:
    if want_probs and _accepts_return_probs(model):
        return model.segment(images, labels, return_probs=True)
    return model.segment(images, labels)


def segment_batch(
    model: Any,
    inputs: Sequence[Any],
    gt_ids: Sequence[tuple[int, ...] | None],
    labels: Sequence[str],
    want_probs: bool,
) -> list[Labelled]:
    """Segment a batch: every image with every label, or each with its ground truth's labels.

    Args:
        model: has ``segment(images, labels[, return_probs])``.
        inputs: what ``segment`` takes for each image (full-size array or prepared image).
        gt_ids: per image, None (prompt every label) or the 1-based ids to prompt with.
        labels: the run's labels.
        want_probs: keep the probabilities (for CRF).
    """
    labels = list(labels)
    results: list[Labelled | None] = [None] * len(inputs)
    groups: dict[tuple[int, ...] | None, list[int]] = {}
    for index, ids in enumerate(gt_ids):
        groups.setdefault(ids, []).append(index)
    for ids, members in groups.items():
        if ids == ():  # no label in its ground truth: all background
            for index in members:
                width, height = _size(inputs[index])
                mask = np.full((height, width), BACKGROUND, np.uint8)
                results[index] = Labelled(mask, dict.fromkeys(labels, 0.0))
            continue
        prompted = labels if ids is None else [labels[i - 1] for i in ids]
        outputs = _segment(model, [inputs[i] for i in members], prompted, want_probs)
        for index, output in zip(members, outputs, strict=True):
            results[index] = _globalise(output, ids, labels, want_probs)
    return [result for result in results if result is not None]


def _size(model_input: Any) -> tuple[int, int]:
    """(width, height) of the image a model input stands for."""
    if hasattr(model_input, "size") and isinstance(model_input.size, tuple):
        return model_input.size  # PreparedImage
    height, width = np.asarray(model_input).shape[:2]
    return width, height


def _globalise(
    output: Any, ids: tuple[int, ...] | None, labels: list[str], want_probs: bool
) -> Labelled:
    """A segmenter's result over ``ids`` (or every label) -> a result over the run's labels."""
    probs = np.asarray(output.probs) if want_probs and output.probs is not None else None
    if ids is None:
        return Labelled(output.mask, dict(output.scores), probs, list(range(1, len(labels) + 1)))
    mask = np.asarray(output.mask)
    if mask.dtype != np.uint8 or int(mask.max(initial=0)) > len(ids):
        raise ValueError(
            f"the segmenter returned a {mask.dtype} mask with ids above {len(ids)}, "
            f"the number of labels it was given"
        )
    table = np.zeros(256, dtype=np.uint8)  # the segmenter's id -> the run's id
    table[1 : len(ids) + 1] = ids
    scores = dict.fromkeys(labels, 0.0)
    scores.update(output.scores)
    return Labelled(table[mask], scores, probs, list(ids))
