"""Confusion-matrix metrics against hand-computed values and the standard mIoU definition."""

from __future__ import annotations

import numpy as np
import pytest

from labeler.metrics import (
    ConfusionMatrix,
    ScoreProtocol,
    class_accuracy,
    class_iou,
    confusion_matrix,
    summarize,
)

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


# -- the protocol and the accumulator ---------------------------------------------------------

# The toy case: ground truth half background, half cat; everything predicted cat.
TOY_GT = np.array([[0, 0], [1, 1]], dtype=np.uint8)
TOY_PRED = np.ones((2, 2), dtype=np.uint8)


def test_toy_case_background_ignored_scores_100_where_excluding_the_mean_only_gave_50() -> None:
    # Background as a class: background IoU 0 / 2 px union, cat 2 / 4 -> mean 25.
    with_background = ConfusionMatrix(["cat"])
    with_background.add(TOY_PRED, TOY_GT)
    assert with_background.summary()["mIoU"] == pytest.approx(25.0)
    # The old --exclude-background: class 0 out of the mean, its pixels still cat's FPs -> 50.
    old = summarize(confusion_matrix(TOY_PRED, TOY_GT, 2), ["bg", "cat"], include_background=False)
    assert old["mIoU"] == pytest.approx(50.0)
    # The protocol: ground-truth background is not scored -> cat 2 / 2 = 100.
    protocol = ConfusionMatrix(["cat"], ScoreProtocol(exclude_background=True))
    protocol.add(TOY_PRED, TOY_GT)
    summary = protocol.summary()
    assert summary["mIoU"] == pytest.approx(100.0)
    assert summary["num_pixels"] == 2
    assert summary["per_class"] == {"background": None, "cat": 100.0}
    assert summary["protocol"] == {
        "ignore_index": [255],
        "exclude_background": True,
        "pred_ignore": "skip",
    }


def test_exclude_background_by_hand() -> None:
    score = ConfusionMatrix(["cat", "dog"], ScoreProtocol(exclude_background=True))
    score.add(PRED, GT)
    # GT's four background pixels are not scored. Left: gt 1 -> 1,1,1,1; gt 2 -> 2,2,0,2, then
    # pred 255 (skipped), 2. Predicted background on a dog pixel is a miss of dog.
    np.testing.assert_array_equal(score.matrix, [[0, 0, 0], [0, 4, 0], [1, 0, 4]])
    summary = score.summary()
    assert summary["per_class"]["cat"] == pytest.approx(100.0)  # 4 / (4 + 4 - 4)
    assert summary["per_class"]["dog"] == pytest.approx(80.0)  # 4 / (5 + 4 - 4)
    assert summary["per_class"]["background"] == pytest.approx(0.0)  # listed, not averaged
    assert summary["mIoU"] == pytest.approx(90.0)
    assert summary["mean_accuracy"] == pytest.approx(90.0)  # (4/4 + 4/5) / 2
    assert summary["pixel_accuracy"] == pytest.approx(100 * 8 / 9)
    assert summary["abstained_pixels"] == 1


def test_several_ignore_indices_by_hand() -> None:
    gt = np.array([[0, 1, 7], [9, 2, 255], [1, 1, 2]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [2, 1, 0], [1, 2, 2]], dtype=np.uint8)
    score = ConfusionMatrix(["cat", "dog"], ScoreProtocol(ignore_index=(7, 9)))
    score.add(pred, gt)
    # Scored: (0,0) 0->0, (0,1) 1->1, (1,1) 2->1, (2,0) 1->1, (2,1) 1->2, (2,2) 2->2.
    np.testing.assert_array_equal(score.matrix, [[1, 0, 0], [0, 2, 1], [0, 1, 1]])
    assert score.protocol.ignore_index == (7, 9, 255)  # 255 always ignored
    summary = score.summary()
    assert summary["per_class"]["cat"] == pytest.approx(100 * 2 / 4)
    assert summary["per_class"]["dog"] == pytest.approx(100 * 1 / 3)
    assert summary["mIoU"] == pytest.approx(100 * (1 + 0.5 + 1 / 3) / 3)
    # A predicted id that is an ignore value outside the classes is an abstention, not an error.
    skipped = ConfusionMatrix(["cat", "dog"], ScoreProtocol(ignore_index=(7, 9)))
    skipped.add(np.array([[9, 7]], np.uint8), np.array([[1, 2]], np.uint8))
    assert skipped.matrix.sum() == 0 and skipped.summary()["abstained_pixels"] == 2


def test_pred_ignore_miss_counts_abstentions_as_false_negatives() -> None:
    score = ConfusionMatrix(["cat", "dog"], ScoreProtocol(pred_ignore="miss"))
    score.add(PRED, GT)
    summary = score.summary()
    # The pixel predicted 255 where gt is dog: dog has 6 gt pixels now, 4 hits, 4 predictions.
    assert summary["per_class"] == pytest.approx(
        {"background": 60.0, "cat": 80.0, "dog": 100 * 4 / 6}
    )
    assert summary["num_pixels"] == 14
    assert summary["pixel_accuracy"] == pytest.approx(100 * 11 / 14)
    assert summary["mean_accuracy"] == pytest.approx(100 * (3 / 4 + 1 + 4 / 6) / 3)


def test_predicted_ids_outside_the_labels_are_an_error_and_add_nothing() -> None:
    score = ConfusionMatrix(["cat"])
    with pytest.raises(ValueError, match=r"pred holds ids \[2\].*another label list"):
        score.add(np.array([[1, 2]], np.uint8), np.array([[1, 1]], np.uint8))
    with pytest.raises(ValueError, match=r"gt holds ids \[5\]"):
        score.add(np.array([[1, 1]], np.uint8), np.array([[1, 5]], np.uint8))
    assert score.images == 0 and score.counts.sum() == 0
    # Predicted background is a class, never an abstention, even when gt 0 is ignored.
    ignoring_zero = ConfusionMatrix(["cat"], ScoreProtocol(ignore_index=(0,)))
    ignoring_zero.add(np.array([[0, 1]], np.uint8), np.array([[1, 1]], np.uint8))
    np.testing.assert_array_equal(ignoring_zero.matrix, [[0, 0], [1, 1]])


def test_merge_equals_adding_everything_to_one() -> None:
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 4, (5, 6)), rng.integers(0, 4, (5, 6))) for _ in range(4)]
    protocol = ScoreProtocol(exclude_background=True, ignore_index=(3,))
    whole, first, second = (ConfusionMatrix(["a", "b", "c"], protocol) for _ in range(3))
    for i, (pred, gt) in enumerate(pairs):
        whole.add(pred, gt)
        (first if i % 2 else second).add(pred, gt)
    first.merge(second)
    np.testing.assert_array_equal(first.counts, whole.counts)
    assert first.summary() == whole.summary()
    with pytest.raises(ValueError, match="differ"):
        first.merge(ConfusionMatrix(["a", "b", "c"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ignore_index": (-1,)}, "non-negative"),
        ({"ignore_index": ("x",)}, "non-negative"),
        ({"pred_ignore": "count"}, "skip, miss"),
    ],
)
def test_protocol_rejects_bad_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ScoreProtocol(**kwargs)


def test_mask_score_keeps_the_refine_reports_numbers() -> None:
    """MaskScore equals the rule the refine report always used: without background, gt 0 ->
    255, the (K, K) matrix with 255 left out in either mask, class 0 out of the mean."""
    from labeler.train.report import MaskScore

    rng = np.random.default_rng(2)
    labels = ["a", "b", "c"]
    for background in (True, False):
        score, conf = MaskScore(labels, background), np.zeros((4, 4), np.int64)
        for _ in range(3):
            gt = rng.integers(0, 4, (9, 7)).astype(np.uint8)
            gt[rng.random(gt.shape) < 0.1] = 255
            low = 0 if background else 1
            pred = rng.integers(low, 4, (9, 7)).astype(np.uint8)
            pred[rng.random(pred.shape) < 0.1] = 255  # a pseudo-mask's uncertain pixels
            score.add(pred, gt)
            old_gt = gt if background else np.where(gt == 0, 255, gt).astype(np.uint8)
            conf += confusion_matrix(pred, old_gt, 4)
        old = summarize(conf, ["background", *labels], include_background=background)
        new = score.summary()
        assert {key: new[key] for key in old} == old
        assert new["images"] == 3
