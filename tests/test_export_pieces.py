"""The exporters' fast paths equal their plain definitions: COCO RLE from runs, id histograms,
Label Studio prediction JSON, the gallery in pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_api

from exporters import (
    brush_prediction,
    brush_prediction_json,
    gallery_figure,
    gallery_head,
    gallery_html,
    gallery_tail,
    id_counts,
    mask_annotations,
    present_ids,
)
from exporters.labelstudio import byte_list_json


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((1, 1), np.uint8) + 1,  # one pixel
        np.full((5, 7), 2, np.uint8),  # full
        np.zeros((4, 4), np.uint8),  # empty
        rng.integers(0, 4, (13, 9)).astype(np.uint8),  # noise, odd sizes
        np.repeat(rng.integers(0, 4, (9, 1)), 300, axis=1).astype(np.uint8),  # long runs
    ]
    blob = np.zeros((37, 53), np.uint8)
    blob[5:30, 10:40] = 3
    blob[0, 0] = 1  # first pixel inside a label
    blob[-1, -1] = 255  # ignore
    masks.append(blob)
    return masks


@pytest.mark.parametrize("index", range(6))
def test_coco_rle_from_runs_equals_pycocotools_encode(index):
    mask = _masks()[index]
    pieces = mask_annotations(mask, 3, scores=[0.1, 0.2, 0.3])
    present = [int(i) for i in np.unique(mask) if 1 <= i <= 3]
    assert [p["category_id"] for p in pieces] == present
    for piece in pieces:
        binary = np.asfortranarray((mask == piece["category_id"]).astype(np.uint8))
        rle = mask_api.encode(binary)
        assert piece["segmentation"]["counts"] == rle["counts"].decode("ascii")
        assert piece["segmentation"]["size"] == [int(s) for s in rle["size"]]
        assert piece["area"] == int(binary.sum())
        assert piece["bbox"] == [float(v) for v in mask_api.toBbox(rle)]
        assert piece["score"] == [0.1, 0.2, 0.3][piece["category_id"] - 1]


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[0, 3, 255], [7, 7, 1]], np.uint8),
        np.array([[True, False]]),
        np.array([[300, 2], [0, 65535]], np.uint16),
        np.array([[-1, 4], [2, 2]], np.int32),
        np.zeros((0, 3), np.uint8),
    ],
)
def test_present_ids_equal_np_unique(mask):
    found = present_ids(mask)
    np.testing.assert_array_equal(found, np.unique(mask))
    assert found.dtype == np.unique(mask).dtype


def test_byte_lists_and_predictions_render_as_json_dumps():
    rng = np.random.default_rng(1)
    for size in (0, 1, 2, 17, 5000):
        values = rng.integers(0, 256, size).astype(np.uint8)
        assert byte_list_json(values) == json.dumps(values.tolist())
    labels = ['d"og "rle": []', "ünï", "x", "a\\b"]
    for mask in _masks():
        mask = np.where(mask == 255, 255, np.minimum(mask, 4)).astype(np.uint8)
        for scores in ({}, {"x": 0.25, "ünï": 1.0, labels[0]: 0.5}):
            expected = json.dumps(brush_prediction(mask, labels, scores, 'v"1'), ensure_ascii=False)
            assert brush_prediction_json(mask, labels, scores, 'v"1') == expected
            counted = brush_prediction_json(mask, labels, scores, 'v"1', counts=id_counts(mask))
            assert counted == expected


def test_gallery_in_pieces_is_the_whole_page():
    entries = [
        {"overlay": "a b.jpg", "file_name": "<a>.jpg", "labels": ["c&d"]},
        {"overlay": "b.jpg", "file_name": "b.jpg", "labels": []},
    ]
    for chosen in (entries, entries[:1], []):
        figures = [gallery_figure(entry, i) for i, entry in enumerate(chosen)]
        pieces = gallery_head(len(chosen)) + "\n".join(figures) + gallery_tail()
        assert pieces == gallery_html(chosen)
