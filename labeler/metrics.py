"""Semantic segmentation metrics from a confusion matrix (the standard mIoU definitions).

Class ids follow the mask convention: 0 = background, k = the k-th label, 255 = ignore.
A confusion matrix is summed over a data set (add the per-image matrices), then summarised:
IoU_c = TP_c / (TP_c + FP_c + FN_c), mIoU = the mean IoU over the classes that occur in the
ground truth or the predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """(K, K) int64 pixel counts, rows = ground-truth class, columns = predicted class.

    Pixels where ``gt == ignore_index`` or ``pred == ignore_index`` are left out.
    Any other value outside ``0..num_classes - 1`` raises ``ValueError``, in ``gt`` and in
    ``pred`` alike: a (K, K) matrix cannot count a prediction of an unknown class without
    charging some known class a false positive, so map extra predicted ids (to 0 or to
    ``ignore_index``) before calling this.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"confusion_matrix: pred shape {pred.shape} != gt shape {gt.shape}")
    if num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    for name, array in (("pred", pred), ("gt", gt)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"confusion_matrix: {name} must hold integer ids, got {array.dtype}")
    keep = (gt != ignore_index) & (pred != ignore_index)  # same shape as gt
    gt_ids = gt[keep].astype(np.int64)  # (N,)
    pred_ids = pred[keep].astype(np.int64)  # (N,)
    for name, ids in (("gt", gt_ids), ("pred", pred_ids)):
        outside = (ids < 0) | (ids >= num_classes)
        if outside.any():
            values = sorted({int(v) for v in np.unique(ids[outside])})[:10]
            raise ValueError(
                f"confusion_matrix: {name} holds ids {values} outside 0..{num_classes - 1} "
                f"(num_classes={num_classes}) that are not ignore_index={ignore_index}"
            )
    flat = gt_ids * num_classes + pred_ids  # (N,)
    counts = np.bincount(flat, minlength=num_classes * num_classes)  # (K * K,)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _check_conf(conf: np.ndarray, where: str) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"{where}: confusion matrix must be square (K, K), got {conf.shape}")
    if (conf < 0).any():
        raise ValueError(f"{where}: confusion matrix has negative counts")
    return conf.astype(np.float64)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise numerator / denominator, nan where the denominator is 0."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.nan)


def class_iou(conf: np.ndarray) -> np.ndarray:
    """(K,) IoU of each class in [0, 1]; nan for a class absent from both gt and pred."""
    conf = _check_conf(conf, "class_iou")
    true_pos = np.diag(conf)  # (K,)
    union = conf.sum(axis=1) + conf.sum(axis=0) - true_pos  # (K,) gt + pred - overlap
    return _ratio(true_pos, union)


def class_accuracy(conf: np.ndarray) -> np.ndarray:
    """(K,) recall of each class (TP / gt pixels); nan for a class absent from the gt."""
    conf = _check_conf(conf, "class_accuracy")
    gt_pixels = conf.sum(axis=1)  # (K,)
    return _ratio(np.diag(conf), gt_pixels)


def _percent_mean(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return float(100.0 * finite.mean()) if finite.size else None


def summarize(
    conf: np.ndarray, class_names: Sequence[str], include_background: bool = True
) -> dict[str, Any]:
    """Percent metrics of a (K, K) confusion matrix whose class k is ``class_names[k]``.

    Returns ``{"mIoU", "per_class", "pixel_accuracy", "mean_accuracy", "num_pixels"}``:
    mIoU is the mean IoU over the classes present in gt or pred (nan-mean); per_class maps each
    name to its IoU in percent, or None when the class is absent; pixel_accuracy is correct /
    counted pixels; mean_accuracy is the mean recall over the classes present in the gt.
    With ``include_background=False`` class 0 is left out of mIoU and mean_accuracy (the
    VOC-20 protocol of the StableSeg paper); it still appears in per_class and pixel_accuracy.
    A mean over no class is None.
    """
    conf_f = _check_conf(conf, "summarize")
    names = list(class_names)
    if len(names) != conf_f.shape[0]:
        raise ValueError(
            f"summarize: {len(names)} class names for a {conf_f.shape[0]}x{conf_f.shape[0]} "
            "confusion matrix"
        )
    ious = class_iou(conf_f)  # (K,)
    recalls = class_accuracy(conf_f)  # (K,)
    first = 0 if include_background else 1
    total = float(conf_f.sum())
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
