"""The model step of ``pseudo-label``: a batch of read images -> masks and scores, on the
main thread.

With ``--labels-from-gt`` each image is prompted with the labels of its own ground truth: the
images of a batch that share a label set are segmented together, each set in its own call,
and their masks are mapped back to the run's global ids. An image without ground truth was
already refused by the reading stage: it is skipped alone, never its batch.

Full-resolution probabilities are asked of the segmenter only when the job needs them
(``--crf``); the writers then refine the segmenter's own result over its prompted labels
(:func:`labeler.crf.crf_segmentation`) and map it to the run's ids.
"""

from __future__ import annotations

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
        result: for ``--crf``: the segmenter's result over its prompted labels, with its
            probabilities (None when nothing was prompted).
        prompted_ids: the run's id of each label ``result`` is over.
    """

    mask: np.ndarray
    scores: dict[str, float]
    result: Any = None
    prompted_ids: list[int] = field(default_factory=list)

    def globalise(self, local_mask: np.ndarray) -> np.ndarray:
        """A mask over the prompted labels (0 background, k = k-th prompted label) -> over
        the run's labels."""
        mask = np.asarray(local_mask)
        if mask.dtype != np.uint8 or int(mask.max(initial=0)) > len(self.prompted_ids):
            raise ValueError(
                f"the segmenter returned a {mask.dtype} mask with ids above "
                f"{len(self.prompted_ids)}, the number of labels it was given"
            )
        table = np.zeros(256, dtype=np.uint8)  # the segmenter's id -> the run's id
        table[1 : len(self.prompted_ids) + 1] = self.prompted_ids
        return table[mask]


def segment_batch(
    model: Any,
    inputs: Sequence[Any],
    gt_ids: Sequence[tuple[int, ...] | None],
    labels: Sequence[str],
    want_probs: bool,
) -> list[Labelled]:
    """Segment a batch: every image with every label, or each with its ground truth's labels.

    Args:
        model: has ``segment(images, labels, *, return_probs)``.
        inputs: what ``segment`` takes for each image (full-size array or prepared image).
        gt_ids: per image, None (prompt every label) or the 1-based ids to prompt with.
        labels: the run's labels.
        want_probs: keep the segmenter's result with its probabilities (for CRF).
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
        prompted_ids = list(range(1, len(labels) + 1)) if ids is None else list(ids)
        outputs = model.segment([inputs[i] for i in members], prompted, return_probs=want_probs)
        for index, output in zip(members, outputs, strict=True):
            labelled = Labelled(output.mask, dict.fromkeys(labels, 0.0), None, prompted_ids)
            labelled.scores.update(output.scores)
            if ids is not None:
                labelled.mask = labelled.globalise(output.mask)
            if want_probs:
                labelled.result = output
            results[index] = labelled
    return [result for result in results if result is not None]


def _size(model_input: Any) -> tuple[int, int]:
    """(width, height) of the image a model input stands for."""
    if hasattr(model_input, "size") and isinstance(model_input.size, tuple):
        return model_input.size  # PreparedImage
    height, width = np.asarray(model_input).shape[:2]
    return width, height
