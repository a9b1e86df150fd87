"""What a dataset preset is: its classes, its ground-truth encodings and its background rule.

Pure: arrays in, arrays out. Finding and reading the files is ``labeler.jobs.datasets``.

Decoded ground truth uses the project's mask ids (``labeler.result``): 0 = background, k = the
k-th class of the preset (1-based, in ``DatasetPreset.class_names`` order), 255 = ignore
(void, unlabelled, VOC's object borders).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..metrics import ConfusionMatrix, ScoreProtocol
from ..result import BACKGROUND, IGNORE, MAX_LABELS

INVALID = -1
"""Marks a raw ground-truth value that a preset's dataset never holds (decoding it fails)."""
CHANNELS = ("index", "red")


@dataclass(frozen=True, eq=False)
class GtEncoding:
    """How one kind of ground-truth file stores its ids, and the table that decodes them.

    Attributes:
        channel: "index": a single-channel (palette "P" or grey "L") PNG whose values are the raw
            ids; "red": an RGB PNG whose red channel holds the raw id (green and blue are not
            read).
        table: (V,) int16 lookup, raw id -> project id (0..254, 255 = ignore), ``INVALID`` for a
            raw value the dataset never holds. Raw values >= V are invalid too.
    """

    channel: str
    table: np.ndarray

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(
                f"GtEncoding: channel must be one of {', '.join(CHANNELS)}, got {self.channel!r}"
            )

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) raw ground truth -> (H, W) uint8 project ids.

        Raises:
            ValueError: the array has the wrong number of channels, or holds raw values the
                dataset never holds (named in the message).
        """
        raw = np.asarray(raw)
        if self.channel == "red":
            if raw.ndim != 3 or raw.shape[2] < 3:
                raise ValueError(
                    f"expected an RGB mask (H, W, 3) with the class id in the red channel, "
                    f"got shape {raw.shape}"
                )
            raw = raw[..., 0]  # (H, W)
        elif raw.ndim != 2:
            raise ValueError(f"expected a single-channel id mask (H, W), got shape {raw.shape}")
        if not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"ground truth must hold integer ids, got {raw.dtype}")
        values = raw.astype(np.int64)  # (H, W)
        in_table = (values >= 0) & (values < len(self.table))
        decoded = np.where(in_table, self.table[np.clip(values, 0, len(self.table) - 1)], INVALID)
        if (decoded == INVALID).any():
            bad = sorted({int(v) for v in np.unique(values[decoded == INVALID])})[:10]
            raise ValueError(f"ground truth holds ids {bad} that this dataset does not use")
        return decoded.astype(np.uint8)  # (H, W)

    def raw_ids(self) -> np.ndarray:
        """(256,) int16: the raw id a project id is written as (the inverse of ``table``).

        A project id several raw ids decode to is written as the smallest of them. Background
        (0) and ignore (255), where no raw id decodes to them, are written as the first raw id
        the dataset ignores (ADE20K's 0 = "other", Cityscapes' 0 = "unlabeled", CamVid's 11 =
        void). ``INVALID`` where a project id has no raw id at all.
        """
        raw_of = np.full(256, INVALID, dtype=np.int16)
        for raw in range(len(self.table) - 1, -1, -1):  # the smallest raw id wins
            project = int(self.table[raw])
            if project not in (INVALID, IGNORE):
                raw_of[project] = raw
        ignored = np.flatnonzero(self.table == IGNORE)
        for project in (BACKGROUND, IGNORE):
            if raw_of[project] == INVALID and len(ignored):
                raw_of[project] = ignored[0]
        return raw_of

    def encode(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) project ids -> the dataset's own raw ids, as its files hold them: (H, W)
        uint8 for an "index" encoding, (H, W, 3) uint8 with the id in red for a "red" one.

        Raises:
            ValueError: the mask holds ids this dataset cannot write (named).
        """
        mask = np.asarray(mask)
        raw_of = self.raw_ids()
        values = mask.astype(np.int64)
        encoded = np.where((values >= 0) & (values < 256), raw_of[np.clip(values, 0, 255)], -1)
        if (encoded < 0).any():
            bad = sorted({int(v) for v in np.unique(values[encoded < 0])})[:10]
            raise ValueError(f"mask ids {bad} have no id in this dataset's format")
        ids = encoded.astype(np.uint8)  # (H, W)
        if self.channel == "red":
            rgb = np.zeros((*ids.shape, 3), np.uint8)  # (H, W, 3)
            rgb[..., 0] = ids
            return rgb
        return ids


def lookup_table(
    mapping: Mapping[int, int], ignored: Sequence[int] = (), size: int = 256
) -> np.ndarray:
    """(size,) int16 table: ``mapping`` raw -> project id, ``ignored`` raw -> 255, else INVALID."""
    table = np.full(size, INVALID, dtype=np.int16)
    for raw in ignored:
        table[raw] = IGNORE
    for raw, project in mapping.items():
        table[raw] = project
    return table


def identity_table(num_classes: int, ignored: Sequence[int] = (IGNORE,)) -> np.ndarray:
    """Raw ids 0..num_classes are already project ids; ``ignored`` values become 255."""
    return lookup_table({k: k for k in range(num_classes + 1)}, ignored)


def shifted_table(num_classes: int, ignored: Sequence[int]) -> np.ndarray:
    """Raw ids 0..num_classes-1 are the classes (no background): raw k -> k + 1."""
    return lookup_table({k: k + 1 for k in range(num_classes)}, ignored)


@dataclass(frozen=True)
class DatasetPreset:
    """A public dataset (or a folder of one's own) as the benchmark reads and scores it.

    Attributes:
        name: registry name (e.g. "voc").
        title: the protocol's usual name (e.g. "PASCAL VOC 2012, PAS-20").
        class_names: the classes, in project id order (id k = ``class_names[k - 1]``).
        background_is_class: True: ground-truth background (0) is scored as class 0 and counts
            in the mean; False: ground-truth background is not scored and class 0 is left out of
            the mean (``ScoreProtocol.exclude_background``).
        background_switchable: whether the other background rule is a known protocol of this
            dataset (e.g. VOC-21 beside PAS-20); False where the data has no background class.
        encodings: ground-truth file kind -> its encoding (most presets have one, "default").
        splits: the split names it knows; ``default_split`` is the one papers report.
        background_rule: a sentence on what 0 means in this dataset and how it is scored.
        layout: the folder layout it reads, for help texts and error messages.
        download: where the dataset is published.
        prediction_kind: the encoding predictions are written in for the dataset's evaluation
            server or scripts (``benchmark --save-masks``): Cityscapes' labelIds, not trainIds.
    """

    name: str
    title: str
    class_names: tuple[str, ...]
    background_is_class: bool
    background_switchable: bool
    encodings: Mapping[str, GtEncoding]
    splits: tuple[str, ...]
    default_split: str
    background_rule: str
    layout: str
    download: str
    prediction_kind: str = "default"

    def __post_init__(self) -> None:
        if not 1 <= len(self.class_names) <= MAX_LABELS:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} classes; a preset has 1..{MAX_LABELS}"
            )
        if self.default_split not in self.splits:
            raise ValueError(f"{self.name}: default split {self.default_split!r} not in splits")
        if self.prediction_kind not in self.encodings:
            raise ValueError(f"{self.name}: prediction kind {self.prediction_kind!r} unknown")

    @property
    def num_classes(self) -> int:
        """Classes without background (ids 1..num_classes)."""
        return len(self.class_names)

    def with_background(self, background_is_class: bool) -> DatasetPreset:
        """The same dataset under the other background rule, where that is a known protocol.

        Raises:
            ValueError: the dataset has no background class to score.
        """
        if background_is_class == self.background_is_class:
            return self
        if not self.background_switchable:
            raise ValueError(
                f"dataset {self.name!r} has no background class to score ({self.background_rule})"
            )
        return dataclasses.replace(self, background_is_class=background_is_class)

    def check_split(self, split: str | None) -> str:
        """``split`` (or the default split) if the preset knows it, else ValueError."""
        split = self.default_split if split is None else split
        if split not in self.splits:
            raise ValueError(
                f"dataset {self.name!r} has no split {split!r}; choose one of "
                f"{', '.join(self.splits)}"
            )
        return split

    def decode(self, raw: np.ndarray, kind: str = "default") -> np.ndarray:
        """(H, W[, C]) raw ground truth of file kind ``kind`` -> (H, W) uint8 project ids."""
        if kind not in self.encodings:
            raise ValueError(
                f"dataset {self.name!r} has no ground-truth kind {kind!r}; "
                f"known: {', '.join(self.encodings)}"
            )
        return self.encodings[kind].decode(raw)

    def encode_prediction(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) predicted project ids -> the dataset's own ids (``prediction_kind``), as its
        evaluation server reads them (see :meth:`GtEncoding.encode`)."""
        return self.encodings[self.prediction_kind].encode(mask)

    def score_protocol(self) -> ScoreProtocol:
        """How this dataset is scored: 255 ignored, and its background rule."""
        return ScoreProtocol(exclude_background=not self.background_is_class)

    def new_score(self) -> ConfusionMatrix:
        """An empty accumulator over background + this preset's classes, by its protocol."""
        return ConfusionMatrix(self.class_names, self.score_protocol())

    def classes_present(self, gt: np.ndarray) -> list[int]:
        """Ids (1..num_classes) of the classes that own a pixel of a decoded ground truth."""
        return classes_present(gt, self.num_classes)

    def names_of(self, class_ids: Sequence[int]) -> list[str]:
        """Class names of 1-based ids (e.g. the classes present, to prompt one image with)."""
        for k in class_ids:
            if not 1 <= k <= self.num_classes:
                raise ValueError(f"{self.name}: class id {k} outside 1..{self.num_classes}")
        return [self.class_names[k - 1] for k in class_ids]


def classes_present(gt: np.ndarray, num_classes: int) -> list[int]:
    """Sorted ids in 1..num_classes that occur in a decoded (H, W) ground truth.

    Background (0) and ignore (255) are never listed: this is the label list the paper's
    protocol prompts an image with.
    """
    ids = np.unique(np.asarray(gt))
    return [int(k) for k in ids if BACKGROUND < k <= num_classes]


def to_dataset_ids(mask: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """A mask predicted with a subset of the classes -> the dataset's ids.

    Args:
        mask: (H, W) ids of a prediction whose label k was ``class_ids[k - 1]`` (0 background,
            255 ignore).
        class_ids: the dataset ids the prediction was prompted with, in prompt order.

    Returns:
        (H, W) uint8: 0 stays 0, 255 stays 255, k becomes ``class_ids[k - 1]``.
    """
    mask = np.asarray(mask)
    table = np.full(256, INVALID, dtype=np.int16)
    table[BACKGROUND] = BACKGROUND
    table[IGNORE] = IGNORE
    for k, dataset_id in enumerate(class_ids, start=1):
        if not 1 <= dataset_id <= MAX_LABELS:
            raise ValueError(f"to_dataset_ids: dataset id {dataset_id} outside 1..{MAX_LABELS}")
        table[k] = dataset_id
    values = mask.astype(np.int64)
    in_table = (values >= 0) & (values < 256)
    mapped = np.where(in_table, table[np.clip(values, 0, 255)], INVALID)  # (H, W)
    if (mapped == INVALID).any():
        bad = sorted({int(v) for v in np.unique(values[mapped == INVALID])})[:10]
        raise ValueError(
            f"to_dataset_ids: mask ids {bad} are not 0, 255 or a prompted label "
            f"(1..{len(class_ids)})"
        )
    return mapped.astype(np.uint8)
