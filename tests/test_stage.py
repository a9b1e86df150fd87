"""The model stage (``labeler.jobs.stage.segment_stream``): full batches, failures reported
item by item, per-item label subsets in global ids, all-background items, bounded memory."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest

from labeler.images import ImageError
from labeler.jobs.stage import Loaded, segment_stream
from labeler.subsets import LabelSubset

LABELS = ["cat", "dog", "bird", "fish"]
BAD = 99  # a pixel value the fake model refuses


@dataclass
class FakeResult:
    mask: np.ndarray
    scores: dict[str, float]


class FakeModel:
    """Takes images at any size; its mask holds every prompted id (0..k) in turn; it refuses
    any batch holding an image whose first pixel is ``BAD``. Notes every call."""

    model_version = "fake"
    input_size = None

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.calls: list[tuple[list[int], list[str]]] = []  # (image keys, labels) per call
        self.lock = threading.Lock()

    def prepare(self, image: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        return np.asarray(image)

    def segment(self, images, labels, **kwargs) -> list[FakeResult]:
        with self.lock:
            self.calls.append(([int(image[0, 0, 1]) for image in images], list(labels)))
        if any(int(image[0, 0, 0]) == BAD for image in images):
            raise ValueError(f"pixel value {BAD}")
        results = []
        for image in images:
            height, width = image.shape[:2]
            ids = np.arange(height * width) % (len(labels) + 1)
            mask = ids.reshape(height, width).astype(np.uint8)  # (H, W) 0..k
            scores = {name: 0.1 * (k + 1) for k, name in enumerate(labels)}
            results.append(FakeResult(mask, scores))
        return results


def picture(key: int, first: int = 0, shape: tuple[int, int] = (3, 4)) -> np.ndarray:
    """(H, W, 3) uint8 with ``key`` in its green channel (the fake notes it)."""
    pixels = np.zeros((*shape, 3), np.uint8)
    pixels[..., 1] = key
    pixels[0, 0, 0] = first
    return pixels


def test_full_batches_in_input_order_with_every_label() -> None:
    model = FakeModel(batch_size=3)
    out = list(segment_stream(range(7), lambda key: Loaded(picture(key)), model, LABELS, workers=2))
    assert [item.key for item in out] == list(range(7))
    assert [keys for keys, _ in model.calls] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(labels == LABELS for _, labels in model.calls)
    for item in out:
        assert item.error is None and item.subset == LabelSubset.every(4)
        assert item.mask.shape == (3, 4) and set(np.unique(item.mask)) == {0, 1, 2, 3, 4}
        assert item.scores == {"cat": 0.1, "dog": 0.2, "bird": pytest.approx(0.3), "fish": 0.4}


def test_an_unreadable_item_is_reported_and_the_stream_goes_on() -> None:
    def load(key: int) -> Loaded:
        if key == 2:
            raise ImageError("truncated file")
        if key == 4:
            raise ValueError("size mismatch: 4x3 image, 5x3 mask")
        return Loaded(picture(key))

    model = FakeModel(batch_size=2)
    out = list(segment_stream(range(6), load, model, LABELS, workers=3))
    assert [(item.key, item.error) for item in out if item.error] == [
        (2, "truncated file"),
        (4, "size mismatch: 4x3 image, 5x3 mask"),
    ]
    assert sorted(item.key for item in out if item.error is None) == [0, 1, 3, 5]
    assert [keys for keys, _ in model.calls] == [[0, 1], [3, 5]]  # full batches of the rest


def test_a_failing_batch_is_retried_image_by_image() -> None:
    model = FakeModel(batch_size=3)
    load = lambda key: Loaded(picture(key, first=BAD if key == 1 else 0))  # noqa: E731
    out = {item.key: item for item in segment_stream(range(3), load, model, LABELS, workers=1)}
    assert [keys for keys, _ in model.calls] == [[0, 1, 2], [0], [1], [2]]
    assert out[1].error == f"segmentation failed: pixel value {BAD}" and out[1].mask is None
    assert out[0].error is None and out[2].error is None
    assert out[0].mask.shape == (3, 4)


def test_no_label_is_all_background_without_a_model_call() -> None:
    model = FakeModel(batch_size=2)
    load = lambda key: Loaded(None, subset=(), size=(5, 2), extra=f"x{key}")  # noqa: E731
    (item,) = segment_stream([7], load, model, LABELS, workers=1)
    assert model.calls == []
    assert item.key == 7 and item.extra == "x7" and item.result is None
    assert item.mask.shape == (2, 5) and not item.mask.any() and item.mask.dtype == np.uint8
    assert item.scores == dict.fromkeys(LABELS, 0.0)


def test_per_item_subsets_share_batches_and_come_back_in_global_ids() -> None:
    subsets = {0: (2, 4), 1: (1,), 2: (2, 4), 3: None, 4: (1,), 5: (2, 4)}
    model = FakeModel(batch_size=2)
    load = lambda key: Loaded(picture(key), subset=subsets[key])  # noqa: E731
    out = {item.key: item for item in segment_stream(range(6), load, model, LABELS, workers=2)}
    assert model.calls == [
        ([0, 2], ["dog", "fish"]),
        ([1, 4], ["cat"]),
        ([3], LABELS),  # the rest, when the items run out
        ([5], ["dog", "fish"]),
    ]
    for key, ids in subsets.items():
        item = out[key]
        expected = {0, *(ids or range(1, 5))}
        assert set(np.unique(item.mask)) == expected, key
        prompted = LabelSubset(ids) if ids else LabelSubset.every(4)
        assert item.subset == prompted
        local = np.asarray(item.result.mask)
        assert np.array_equal(item.mask, prompted.to_global(local))
    assert out[0].scores == {"cat": 0.0, "dog": 0.1, "bird": 0.0, "fish": 0.2}
    assert out[1].scores == {"cat": 0.1, "dog": 0.0, "bird": 0.0, "fish": 0.0}


def test_items_waiting_for_a_full_batch_stay_below_max_waiting() -> None:
    """Twenty items over seven label sets: the stage runs the fullest waiting group as soon
    as it holds more than ``max_waiting`` items, so it never holds the whole input."""
    batch, workers, max_waiting = 4, 1, 3
    lock = threading.Lock()
    loaded, peak, out = [0], [0], []

    def load(key: int) -> Loaded:
        with lock:
            loaded[0] += 1
            peak[0] = max(peak[0], loaded[0] - len(out))
        return Loaded(picture(key), subset=subsets[key])

    subsets = [(key % 4 + 1,) if key < 4 else (1, key % 3 + 2) for key in range(20)]
    model = FakeModel(batch_size=batch)
    for item in segment_stream(
        range(20), load, model, LABELS, workers=workers, max_waiting=max_waiting
    ):
        with lock:
            out.append(item)
        assert item.subset == LabelSubset(subsets[item.key])
    assert sorted(item.key for item in out) == list(range(20))
    # read ahead (batch + workers) plus at most max_waiting + 1 held back
    assert peak[0] <= batch + workers + max_waiting + 1
    assert all(len(keys) <= batch for keys, _ in model.calls)


def test_stableseg_through_the_stage_equals_its_own_segment(tiny_model) -> None:
    """The tiny StableSeg: ``prepare`` in the readers and a subset batch give the masks and
    scores of ``segment`` on the images, mapped to global ids."""
    rng = np.random.default_rng(0)
    images = [(rng.random((20 + 4 * i, 30, 3)) * 255).astype(np.uint8) for i in range(3)]
    subsets = [(1, 3), (1, 3), None]
    load = lambda key: Loaded(images[key], subset=subsets[key])  # noqa: E731
    out = {item.key: item for item in segment_stream(range(3), load, tiny_model, LABELS, workers=2)}
    for key, ids in enumerate(subsets):
        subset = LabelSubset(ids) if ids else LabelSubset.every(4)
        (alone,) = tiny_model.segment([images[key]], subset.names(LABELS))
        assert np.array_equal(out[key].mask, subset.to_global(alone.mask)), key
        assert out[key].mask.shape == images[key].shape[:2]
        for name, value in alone.scores.items():
            assert out[key].scores[name] == pytest.approx(value, abs=1e-5)
