"""Semantic segmentation scores: the evaluation protocol and one confusion-matrix accumulator.

Class ids follow the mask convention of ``labeler.result``: 0 = background, k = the k-th label,
255 = ignore. A :class:`ConfusionMatrix` sums per-image counts over a data set and summarises
them by the standard definitions: IoU_c = TP_c / (TP_c + FP_c + FN_c), mIoU = the mean IoU over
the classes that occur in the ground truth or the predictions.

The :class:`ScoreProtocol` says which pixels are scored; it is decided by the ground truth alone:

- a ground-truth pixel whose id is one of ``ignore_index`` (always including 255) is not scored;
- with ``exclude_background``, ground-truth background (0) is not scored either, and class 0 is
  left out of the means (the PAS-20, PC-59 and A-150 protocols): a background pixel predicted as
  "cat" is not a false positive of cat;
- a scored pixel whose predicted id is a class (0..K-1) counts in the usual way; predicted
  background on a scored pixel is a false negative of the pixel's class;
- a scored pixel whose predicted id is not a class but one of the ignore ids (the prediction
  abstained, e.g. a pseudo-mask's uncertain 255) is left out with ``pred_ignore="skip"`` (the
  default) or counted as a false negative of its ground-truth class, a false positive of no
  class, with ``pred_ignore="miss"`` (mmsegmentation's rule);
- any other predicted id outside 0..K-1 is an error: the prediction was made with another label
  list, and charging it to some class would hide that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .result import BACKGROUND, IGNORE, MAX_LABELS

PRED_IGNORE_RULES = ("skip", "miss")


@dataclass(frozen=True)
class ScoreProtocol:
    """Which pixels are scored and how (see the module docstring).

    Attributes:
        ignore_index: ground-truth ids that are not scored; 255 is always among them.
        exclude_background: ground-truth background (0) is not scored and class 0 is left out of
            mIoU and mean accuracy.
        pred_ignore: what a scored pixel predicted as an ignore id counts as: "skip" (left
            out) or "miss" (a false negative of its ground-truth class).
    """

    ignore_index: tuple[int, ...] = (IGNORE,)
    exclude_background: bool = False
    pred_ignore: str = "skip"

    def __post_init__(self) -> None:
        values = self.ignore_index
        if isinstance(values, (int, np.integer)):
            values = (int(values),)
        values = tuple(values)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(
                    "ScoreProtocol: ignore_index values must be non-negative integers, "
                    f"got {value!r}"
                )
        object.__setattr__(self, "ignore_index", tuple(sorted({IGNORE, *map(int, values)})))
        if self.pred_ignore not in PRED_IGNORE_RULES:
            raise ValueError(
                f"ScoreProtocol: pred_ignore must be one of {', '.join(PRED_IGNORE_RULES)}, "
                f"got {self.pred_ignore!r}"
            )

    @property
    def gt_ignored(self) -> tuple[int, ...]:
        """Every ground-truth id that is not scored (background too when it is excluded)."""
        extra = (BACKGROUND,) if self.exclude_background else ()
        return tuple(sorted({*self.ignore_index, *extra}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ignore_index": list(self.ignore_index),
            "exclude_background": self.exclude_background,
            "pred_ignore": self.pred_ignore,
        }

    def describe(self) -> str:
        """One line for a report: which ground-truth pixels are left out and what is averaged."""
        ids = ", ".join(str(i) for i in self.ignore_index)
        if self.exclude_background:
            rule = "ground-truth background not scored, class 0 left out of the mean"
        else:
            rule = "background scored as class 0"
        return f"ignored ground truth {ids}; {rule}; predicted ignore ids: {self.pred_ignore}"


def _integer_ids(array: np.ndarray, name: str, where: str) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: {name} must hold integer ids, got {array.dtype}")
    return array


def _count(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    gt_ignored: Iterable[int],
    where: str,
) -> np.ndarray:
    """(K, K + 1) int64 counts: rows = ground-truth class, columns = predicted class, and a last
    column for scored pixels predicted as one of ``gt_ignored`` outside 0..K-1 (abstentions)."""
    pred = _integer_ids(pred, "pred", where)
    gt = _integer_ids(gt, "gt", where)
    if pred.shape != gt.shape:
        raise ValueError(f"{where}: pred shape {pred.shape} != gt shape {gt.shape}")
    if num_classes < 1:
        raise ValueError(f"{where}: num_classes must be >= 1, got {num_classes}")
    ignored = np.asarray(sorted(set(gt_ignored)), dtype=np.int64)  # (I,)
    scored = ~np.isin(gt, ignored)  # same shape as gt
    gt_ids = gt[scored].astype(np.int64)  # (N,)
    pred_ids = pred[scored].astype(np.int64)  # (N,)
    outside = (gt_ids < 0) | (gt_ids >= num_classes)
    if outside.any():
        values = sorted({int(v) for v in np.unique(gt_ids[outside])})[:10]
        raise ValueError(
            f"{where}: gt holds ids {values} outside 0..{num_classes - 1} "
            f"(num_classes={num_classes}) that are not ignored ({ignored.tolist()})"
        )
    is_class = (pred_ids >= 0) & (pred_ids < num_classes)  # (N,)
    abstained = ~is_class & np.isin(pred_ids, ignored)  # (N,)
    unknown = ~is_class & ~abstained
    if unknown.any():
        values = sorted({int(v) for v in np.unique(pred_ids[unknown])})[:10]
        raise ValueError(
            f"{where}: pred holds ids {values} outside 0..{num_classes - 1} "
            f"(num_classes={num_classes}) that are not ignore ids ({ignored.tolist()}); "
            "was it made with another label list?"
        )
    columns = np.where(is_class, pred_ids, num_classes)  # (N,) abstentions -> column K
    width = num_classes + 1
    counts = np.bincount(gt_ids * width + columns, minlength=num_classes * width)  # (K*(K+1),)
    return counts.reshape(num_classes, width).astype(np.int64)


def confusion_matrix(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    ignore_index: int | Sequence[int] = IGNORE,
) -> np.ndarray:
    """(K, K) int64 pixel counts of one image, rows = ground-truth class, columns = predicted.

    Ground-truth pixels whose id is in ``ignore_index`` are left out, and so are pixels whose
    prediction is one of ``ignore_index`` outside 0..K-1 (the "skip" rule). Any other id outside
    ``0..num_classes - 1`` raises ``ValueError``, in ``gt`` and in ``pred`` alike. For a data set
    use :class:`ConfusionMatrix`, which also applies the rest of the :class:`ScoreProtocol`.
    """
    ignored = [ignore_index] if isinstance(ignore_index, (int, np.integer)) else ignore_index
    return _count(pred, gt, num_classes, ignored, "confusion_matrix")[:, :num_classes]


def _check_conf(conf: np.ndarray, where: str) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"{where}: confusion matrix must be square (K, K), got {conf.shape}")
    if (conf < 0).any():
        raise ValueError(f"{where}: confusion matrix has negative counts")
    return conf.astype(np.float64)


def _check_missed(missed: np.ndarray | None, size: int, where: str) -> np.ndarray:
    if missed is None:
        return np.zeros(size, dtype=np.float64)
    missed = np.asarray(missed, dtype=np.float64)
    if missed.shape != (size,) or (missed < 0).any():
        raise ValueError(f"{where}: missed must be ({size},) non-negative counts")
    return missed


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise numerator / denominator, nan where the denominator is 0."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.nan)


def class_iou(conf: np.ndarray, missed: np.ndarray | None = None) -> np.ndarray:
    """(K,) IoU of each class in [0, 1]; nan for a class absent from both gt and pred.

    ``missed`` (K,) counts each class's ground-truth pixels predicted as no class (the "miss"
    rule); they are false negatives.
    """
    conf = _check_conf(conf, "class_iou")
    missed = _check_missed(missed, conf.shape[0], "class_iou")
    true_pos = np.diag(conf)  # (K,)
    union = conf.sum(axis=1) + missed + conf.sum(axis=0) - true_pos  # (K,) gt + pred - overlap
    return _ratio(true_pos, union)


def class_accuracy(conf: np.ndarray, missed: np.ndarray | None = None) -> np.ndarray:
    """(K,) recall of each class (TP / gt pixels); nan for a class absent from the gt."""
    conf = _check_conf(conf, "class_accuracy")
    missed = _check_missed(missed, conf.shape[0], "class_accuracy")
    gt_pixels = conf.sum(axis=1) + missed  # (K,)
    return _ratio(np.diag(conf), gt_pixels)


def _percent_mean(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return float(100.0 * finite.mean()) if finite.size else None


def summarize(
    conf: np.ndarray,
    class_names: Sequence[str],
    include_background: bool = True,
    missed: np.ndarray | None = None,
) -> dict[str, Any]:
    """Percent metrics of a (K, K) confusion matrix whose class k is ``class_names[k]``.

    Returns ``{"mIoU", "per_class", "pixel_accuracy", "mean_accuracy", "num_pixels"}``:
    mIoU is the mean IoU over the classes present in gt or pred (nan-mean); per_class maps each
    name to its IoU in percent, or None when the class is absent; pixel_accuracy is correct /
    counted pixels; mean_accuracy is the mean recall over the classes present in the gt.
    With ``include_background=False`` class 0 is left out of mIoU and mean_accuracy; it still
    appears in per_class and pixel_accuracy. ``missed`` (K,) adds ground-truth pixels predicted
    as no class (false negatives, counted pixels). A mean over no class is None.
    """
    conf_f = _check_conf(conf, "summarize")
    names = list(class_names)
    if len(names) != conf_f.shape[0]:
        raise ValueError(
            f"summarize: {len(names)} class names for a {conf_f.shape[0]}x{conf_f.shape[0]} "
            "confusion matrix"
        )
    missed_f = _check_missed(missed, conf_f.shape[0], "summarize")
    ious = class_iou(conf_f, missed_f)  # (K,)
    recalls = class_accuracy(conf_f, missed_f)  # (K,)
    first = 0 if include_background else 1
    total = float(conf_f.sum() + missed_f.sum())
    return {
        "mIoU": _percent_mean(ious[first:]),
        "per_class": {
            name: (None if np.isnan(iou) else float(100.0 * iou))
            for name, iou in zip(names, ious, strict=True)
        },
        "pixel_accuracy": float(100.0 * np.trace(conf_f) / total) if total > 0 else None,
        "mean_accuracy": _percent_mean(recalls[first:]),
        "num_pixels": int(total),
    }


class ConfusionMatrix:
    """Sums one data set's confusion matrix under a :class:`ScoreProtocol`, then summarises it.

    Classes are ``[background_name, *labels]``: id 0 is background, id k is ``labels[k - 1]``.
    ``add`` one (pred, gt) pair per image; ``merge`` another accumulator (e.g. from another
    process); ``summary`` gives the figures.
    """

    def __init__(
        self,
        labels: Sequence[str],
        protocol: ScoreProtocol | None = None,
        background_name: str = "background",
    ) -> None:
        labels = list(labels)
        if len(labels) > MAX_LABELS:
            raise ValueError(
                f"ConfusionMatrix: at most {MAX_LABELS} labels fit a mask, got {len(labels)}"
            )
        self.class_names = [background_name, *labels]
        self.protocol = protocol or ScoreProtocol()
        size = len(self.class_names)
        # (K, K + 1): the last column counts scored pixels the prediction abstained on.
        self.counts = np.zeros((size, size + 1), dtype=np.int64)
        self.images = 0

    @property
    def num_classes(self) -> int:
        """K = labels + background."""
        return len(self.class_names)

    @property
    def matrix(self) -> np.ndarray:
        """(K, K) counts of scored pixels predicted as a class; rows gt, columns pred."""
        return self.counts[:, : self.num_classes]

    @property
    def abstained(self) -> np.ndarray:
        """(K,) scored ground-truth pixels of each class predicted as an ignore id."""
        return self.counts[:, self.num_classes]

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """One image: (H, W) predicted ids and (H, W) ground-truth ids of the same size.

        Raises:
            ValueError: different shapes, non-integer masks, a ground-truth id that is neither a
                class nor ignored, or a predicted id that is neither a class nor an ignore id.
                Nothing is added then.
        """
        self.counts += _count(
            pred, gt, self.num_classes, self.protocol.gt_ignored, "ConfusionMatrix.add"
        )
        self.images += 1

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another accumulator's counts (same classes and protocol)."""
        if other.class_names != self.class_names or other.protocol != self.protocol:
            raise ValueError("ConfusionMatrix.merge: the classes or the protocol differ")
        self.counts += other.counts
        self.images += other.images

    def summary(self) -> dict[str, Any]:
        """:func:`summarize` of the sum under the protocol, plus ``images``, ``protocol`` and
        ``abstained_pixels`` (scored pixels predicted as an ignore id: left out under "skip",
        counted as misses under "miss")."""
        missed = self.abstained if self.protocol.pred_ignore == "miss" else None
        figures = summarize(
            self.matrix,
            self.class_names,
            include_background=not self.protocol.exclude_background,
            missed=missed,
        )
        return {
            **figures,
            "images": self.images,
            "abstained_pixels": int(self.abstained.sum()),
            "protocol": self.protocol.to_dict(),
        }
