"""Per-image label subsets: each image prompted with its own labels, results in global ids.

The paper's protocol (its section 5) prompts every image with the classes its ground truth
holds, and ``refine --labels-from-gt`` / ``--image-labels`` do the same on a pool. The segmenter
numbers the labels it was prompted with 1..k; a :class:`LabelSubset` remembers which global
labels those were, maps masks back to the global ids (k-th prompted label -> its id in the full
list), and says which channel of the image's maps holds a global label. The model stage
(:mod:`labeler.jobs.stage`) puts images that share a label set into one ``segment`` call.

    >>> subset = LabelSubset((3, 7))  # labels 3 and 7 of the full list, in that order
    >>> subset.to_global(np.array([[0, 1, 2, 255]], np.uint8)).tolist()
    [[0, 3, 7, 255]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .result import BACKGROUND, IGNORE, MAX_LABELS


@dataclass(frozen=True)
class LabelSubset:
    """The global ids (1-based, ascending, unique, at least one) an image is prompted with.

    Prompted label k (mask id k, map channel k - 1) is global label ``ids[k - 1]``.
    """

    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        ids = tuple(int(i) for i in self.ids)
        if not ids:
            raise ValueError("a label subset needs at least one label id")
        bad = [i for i in ids if not 1 <= i <= MAX_LABELS]
        if bad:
            raise ValueError(f"label ids {bad} outside 1..{MAX_LABELS}")
        if list(ids) != sorted(set(ids)):
            raise ValueError(f"label ids must be ascending and unique, got {list(ids)}")
        object.__setattr__(self, "ids", ids)

    @classmethod
    def every(cls, num_labels: int) -> LabelSubset:
        """All labels 1..num_labels (no subset: the prompt names every label)."""
        return cls(tuple(range(1, num_labels + 1)))

    def __len__(self) -> int:
        return len(self.ids)

    def names(self, labels: Sequence[str]) -> list[str]:
        """The prompt's label names, from the full list ``labels`` (id k = ``labels[k - 1]``)."""
        if self.ids[-1] > len(labels):
            raise ValueError(f"label id {self.ids[-1]} but only {len(labels)} labels")
        return [labels[i - 1] for i in self.ids]

    def to_global(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) mask of prompted ids (0 background, 255 ignore) -> (H, W) uint8 global ids.

        Raises ``ValueError`` for an id that is neither 0, 255 nor a prompted label.
        """
        from .datasets.base import to_dataset_ids

        return to_dataset_ids(mask, self.ids)

    def channel_table(self, background_channel: bool = False) -> np.ndarray:
        """(256,) int64: global mask id -> the channel of this image's maps that holds it.

        Label ``ids[k]`` is channel k; with ``background_channel`` (a background prompt's map
        follows the labels') background (0) is channel ``len(ids)``. Everything else (ignore,
        labels not prompted in this image) is -1: it has no channel.
        """
        table = np.full(IGNORE + 1, -1, dtype=np.int64)
        table[list(self.ids)] = np.arange(len(self.ids))
        if background_channel:
            table[BACKGROUND] = len(self.ids)
        return table
