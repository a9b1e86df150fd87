"""The model stage with a model loaded on first need (the backend's /predict), and the
growing read-ahead window it uses."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from labeler.images import ImageError
from labeler.jobs.pipeline import ordered_map
from labeler.jobs.stage import Loaded, segment_stream


@dataclass
class _Result:
    mask: np.ndarray  # (H, W) uint8
    scores: dict[str, float]


class _Model:
    """A model with the stage's protocol: every pixel is the first label."""

    model_version = "fake"
    input_size = None

    def __init__(self, batch_size: int = 2) -> None:
        self.batch_size = batch_size
        self.calls: list[int] = []

    def prepare(self, image, size=None):
        return image

    def segment(self, images, labels, **kwargs):
        self.calls.append(len(images))
        return [_Result(np.ones(image.shape[:2], np.uint8), {labels[0]: 0.5}) for image in images]


def _load(key: int) -> Loaded:
    if key % 3 == 0:
        raise ImageError(f"image {key} cannot be read")
    return Loaded(np.zeros((4, 5, 3), np.uint8))


def test_a_deferred_model_is_opened_once_when_the_first_readable_item_comes():
    model = _Model()
    opens: list[int] = []
    guard = threading.Lock()

    def open_model() -> _Model:
        with guard:
            opens.append(1)
        time.sleep(0.01)  # let the other readers ask for it meanwhile
        return model

    out = list(segment_stream(range(10), _load, open_model, ["cat", "dog"], workers=4))
    assert opens == [1]
    assert sorted(item.key for item in out) == list(range(10))
    failed = {item.key: item.error for item in out if item.error}
    assert failed == {key: f"image {key} cannot be read" for key in (0, 3, 6, 9)}
    masks = [item.mask for item in out if item.error is None]
    assert len(masks) == 6 and all(mask.shape == (4, 5) and mask.max() == 1 for mask in masks)
    assert model.calls == [2, 2, 2]  # full batches of the model's batch size


def test_a_deferred_model_is_never_opened_when_no_item_needs_it():
    def open_model() -> _Model:
        raise AssertionError("the model was opened")

    out = list(segment_stream([0, 3, 6], _load, open_model, ["cat"], workers=2))
    assert [item.error for item in out] == [f"image {key} cannot be read" for key in (0, 3, 6)]
    empty = list(
        segment_stream(
            [1, 2], lambda key: Loaded(subset=(), size=(3, 2)), open_model, ["cat"], workers=2
        )
    )
    assert [item.mask.shape for item in empty] == [(2, 3), (2, 3)]


def test_a_model_that_cannot_load_ends_the_stream():
    def open_model() -> _Model:
        raise ValueError("cannot load the model 'nowhere'")

    with pytest.raises(ValueError, match="nowhere"):
        list(segment_stream(range(6), _load, open_model, ["cat"], workers=2))


def test_the_read_ahead_window_may_grow():
    window = [2]
    running, peak = [0], [0]
    guard = threading.Lock()

    def work(item: int) -> int:
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.005)
        with guard:
            running[0] -= 1
        return item

    results = []
    for item in ordered_map(work, range(40), workers=8, ahead=lambda: window[0]):
        results.append(item)
        if item == 10:
            assert peak[0] <= 2
            window[0] = 6
    assert results == list(range(40))
    assert 2 < peak[0] <= 6
