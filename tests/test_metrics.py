"""Confusion-matrix metrics against hand-computed values and the standard mIoU definition."""

from __future__ import annotations

import numpy as np
import pytest

from labeler.metrics import class_accuracy, class_iou, confusion_matrix, summarize

# A 4x4 example. gt has two ignore pixels, pred one; 13 pixels are counted.
GT = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 2, 2],
        [2, 2, 255, 255],
    ]
)
PRED = np.array(
    [
        [0, 1, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 0, 2],
        [255, 2, 2, 2],
    ]
)
# By hand: gt 0 -> pred 0,1,0,0; gt 1 -> all 1; gt 2 -> 2,2,0,2 then (ignored), 2.
EXPECTED_CONF = np.array(
    [
        [3, 1, 0],
        [0, 4, 0],
        [1, 0, 4],
    ]
)
# IoU = TP / (gt + pred - TP): 3/(4+4-3), 4/(4+5-4), 4/(5+4-4).
EXPECTED_IOU = np.array([3 / 5, 4 / 5, 4 / 5])


def test_confusion_matrix_by_hand() -> None:
    conf = confusion_matrix(PRED, GT, num_classes=3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, EXPECTED_CONF)
    assert conf.sum() == 13  # 16 pixels less 2 ignored in gt and 1 in pred


def test_class_iou_and_summary_by_hand() -> None:
    conf = confusion_matrix(PRED, GT, num_classes=3)
    np.testing.assert_allclose(class_iou(conf), EXPECTED_IOU)
    np.testing.assert_allclose(class_accuracy(conf), [3 / 4, 4 / 4, 4 / 5])

    summary = summarize(conf, ["background", "cat", "dog"])
    assert summary["mIoU"] == pytest.approx(100 * (0.6 + 0.8 + 0.8) / 3)
    assert summary["per_class"] == pytest.approx({"background": 60.0, "cat": 80.0, "dog": 80.0})
    assert summary["pixel_accuracy"] == pytest.approx(100 * 11 / 13)
    assert summary["mean_accuracy"] == pytest.approx(100 * (0.75 + 1.0 + 0.8) / 3)
    assert summary["num_pixels"] == 13


def test_summary_without_background_follows_voc20_protocol() -> None:
    conf = confusion_matrix(PRED, GT, num_classes=3)
    summary = summarize(conf, ["background", "cat", "dog"], include_background=False)
    assert summary["mIoU"] == pytest.approx(80.0)  # (0.8 + 0.8) / 2
    assert summary["mean_accuracy"] == pytest.approx(90.0)  # (1.0 + 0.8) / 2
    assert summary["per_class"]["background"] == pytest.approx(60.0)  # still reported
    assert summary["pixel_accuracy"] == pytest.approx(100 * 11 / 13)


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    conf = confusion_matrix(PRED, GT, num_classes=4)  # class 3 occurs nowhere
    ious = class_iou(conf)
    assert np.isnan(ious[3])
    summary = summarize(conf, ["background", "cat", "dog", "bird"])
    assert summary["per_class"]["bird"] is None
    assert summary["mIoU"] == pytest.approx(100 * (0.6 + 0.8 + 0.8) / 3)


def test_class_only_predicted_counts_with_zero_iou() -> None:
    gt = np.zeros((2, 2), dtype=np.uint8)
    pred = np.array([[0, 0], [0, 1]], dtype=np.uint8)
    conf = confusion_matrix(pred, gt, num_classes=2)
    np.testing.assert_allclose(class_iou(conf), [3 / 4, 0.0])  # a false positive is not absent
    assert summarize(conf, ["bg", "cat"])["mIoU"] == pytest.approx(100 * 3 / 8)


def test_custom_ignore_index() -> None:
    gt = np.array([[0, 1], [9, 1]])
    pred = np.array([[0, 1], [1, 9]])
    conf = confusion_matrix(pred, gt, num_classes=2, ignore_index=9)
    np.testing.assert_array_equal(conf, [[1, 0], [0, 1]])


def test_miou_matches_standard_definition_over_a_dataset() -> None:
    rng = np.random.default_rng(0)
    num_classes = 5
    pairs = []
    for shape in [(17, 23), (8, 31)]:
        gt = rng.integers(0, num_classes, shape)
        pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, num_classes, shape))
        gt[rng.random(shape) < 0.1] = 255
        pred[rng.random(shape) < 0.05] = 255
        pairs.append((pred, gt))
    conf = sum(confusion_matrix(p, g, num_classes) for p, g in pairs)

    # Standard definition over all valid pixels of the data set, computed with set counts.
    all_pred = np.concatenate([p.ravel() for p, _ in pairs])
    all_gt = np.concatenate([g.ravel() for _, g in pairs])
    valid = (all_gt != 255) & (all_pred != 255)
    ious = []
    for c in range(num_classes):
        in_gt, in_pred = (all_gt == c) & valid, (all_pred == c) & valid
        ious.append((in_gt & in_pred).sum() / (in_gt | in_pred).sum())
    summary = summarize(conf, [f"c{c}" for c in range(num_classes)])
    assert summary["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert summary["num_pixels"] == int(valid.sum())
    assert summary["pixel_accuracy"] == pytest.approx(100 * (all_gt == all_pred)[valid].mean())


@pytest.mark.parametrize(
    ("pred", "gt", "message"),
    [
        (np.zeros((2, 2), int), np.full((2, 2), 3), r"gt holds ids \[3\]"),
        (np.full((2, 2), 7), np.zeros((2, 2), int), r"pred holds ids \[7\]"),
        (np.zeros((2, 3), int), np.zeros((2, 2), int), "shape"),
        (np.zeros((2, 2)), np.zeros((2, 2), int), "integer"),
    ],
)
def test_confusion_matrix_rejects_bad_input(pred, gt, message) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_matrix(pred, gt, num_classes=3)


def test_summarize_rejects_wrong_number_of_names() -> None:
    with pytest.raises(ValueError, match="2 class names for a 3x3"):
        summarize(EXPECTED_CONF, ["a", "b"])
