"""StableSeg++ weight fitting on planted maps: the map that agrees with the targets wins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labeler.train.mapweights import (
    fit_map_weights,
    pixels_per_image,
    sample_pixels,
    stack_maps,
    targets_at,
)
from labeler.train.trainer_settings import MapFitConfig

from .refine_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 4
GOOD = 2  # index of the layer whose map agrees with the targets


def _planted(num_layers: int = 5, pixels: int = 4000, seed: int = 0):
    """(features (N, L, C), labels (N,)): layer GOOD peaks on the label, the others are noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=pixels)  # (N,)
    features = rng.dirichlet(np.ones(NUM_CLASSES), size=(pixels, num_layers))  # (N, L, C)
    agree = np.full((pixels, NUM_CLASSES), 0.3 / (NUM_CLASSES - 1))
    agree[np.arange(pixels), labels] = 0.7
    features[:, GOOD] = agree
    return torch.from_numpy(features).half(), torch.from_numpy(labels)


def test_the_agreeing_map_dominates_and_the_loss_falls() -> None:
    features, labels = _planted()
    names = [f"layer{i}" for i in range(features.shape[1])]
    initial = dict.fromkeys(names, 0.2)
    fit = fit_map_weights(features, labels, names, initial, MapFitConfig(steps=200))

    weights = np.array([fit.weights[n] for n in names])
    assert (weights >= 0).all()
    assert weights.sum() == pytest.approx(1.0, rel=1e-4)  # rescaled to the starting total
    others = np.delete(weights, GOOD)
    assert weights[GOOD] > 0.8
    assert weights[GOOD] > 10 * others.max()
    assert fit.final_loss < fit.initial_loss - 0.3
    assert np.mean(fit.loss[-20:]) < np.mean(fit.loss[:20])
    assert fit.pixels == len(labels) and len(fit.loss) == 200


def test_layers_left_out_by_the_uniform_plan_can_still_win() -> None:
    features, labels = _planted()
    names = [f"layer{i}" for i in range(features.shape[1])]
    initial = {n: (0.0 if i == GOOD else 0.25) for i, n in enumerate(names)}
    fit = fit_map_weights(features, labels, names, initial, MapFitConfig(steps=300))
    assert fit.initial[names[GOOD]] == 0.0
    assert max(fit.weights, key=fit.weights.get) == names[GOOD]


def test_fit_rejects_mismatched_inputs() -> None:
    features, labels = _planted(pixels=10)
    with pytest.raises(ValueError, match="features must be"):
        fit_map_weights(features, labels, ["only-one"], {})
    with pytest.raises(ValueError, match="one label per pixel"):
        fit_map_weights(features, labels[:3], [f"l{i}" for i in range(5)], {})


def test_targets_and_sampling_follow_the_mask_convention() -> None:
    mask = np.array([[0, 1, 2, 255]] * 4, dtype=np.uint8)  # (4, 4)
    targets = targets_at(mask, (4, 4))
    np.testing.assert_array_equal(targets[0], [-1, 0, 1, -1])  # background and ignore left out

    maps = {
        "a": np.random.default_rng(0).random((2, 2, 2)).astype(np.float16),  # (C, h, w)
        "b": np.ones((2, 4, 4), dtype=np.float16) / 2,
    }
    stacked = stack_maps(maps, ["b", "a"], (4, 4))
    assert stacked.shape == (2, 2, 4, 4)  # (L, C, S, S), in the order asked for
    features, labels = sample_pixels(stacked, targets, count=5, rng=np.random.default_rng(0))
    assert features.shape == (5, 2, 2) and features.dtype == torch.float16
    assert set(labels.tolist()) <= {0, 1}
    few, _ = sample_pixels(stacked, targets, count=100, rng=np.random.default_rng(0))
    assert len(few) == 8  # every pixel with a target, no more
    with pytest.raises(KeyError, match="missing"):
        stack_maps(maps, ["c"], (4, 4))


def test_pixels_per_image_respects_the_budget() -> None:
    config = MapFitConfig(pixels_per_image=1000, max_pixels=5000)
    assert pixels_per_image(config, 2) == 1000
    assert pixels_per_image(config, 50) == 100
    assert pixels_per_image(config, 10**6) == 1


def test_targets_fit_background_only_when_it_has_a_map() -> None:
    from labeler.train.mapweights import targets_at

    mask = np.array([[0, 1], [2, 255]], np.uint8)
    np.testing.assert_array_equal(targets_at(mask, (2, 2)), [[-1, 0], [1, -1]])
    # A background prompt's map is the channel after the labels' (here 2 labels -> index 2).
    np.testing.assert_array_equal(targets_at(mask, (2, 2), background_index=2), [[2, 0], [1, -1]])


def test_a_student_that_predicts_only_background_is_warned_about() -> None:
    from labeler.train.mapweights import PixelSampler

    maps = {"a": np.full((3, 2, 2), 1 / 3, np.float32)}  # 2 labels + the background prompt
    config = MapFitConfig()
    sampler = PixelSampler(["a"], (2, 2), config, num_images=2, background_index=2)
    sampler.add(maps, np.zeros((4, 4), np.uint8))  # all background: fitted, as channel 2
    sampler.add(maps, np.zeros((4, 4), np.uint8))
    warning = sampler.background_only()
    assert warning is not None and "only background" in warning
    assert len(sampler.samples()[1]) == 8  # the fit can still run; the warning says why not to
    sampler.add(maps, np.array([[0, 1], [0, 0]], np.uint8).repeat(2, 0).repeat(2, 1))
    assert sampler.background_only() is None  # one label pixel is enough
    # Without a background prompt nothing of an all-background mask is fitted (an error).
    plain = PixelSampler(["a"], (2, 2), config, num_images=1)
    plain.add({"a": np.full((2, 2, 2), 0.5, np.float32)}, np.zeros((4, 4), np.uint8))
    assert plain.background_only() is None
    with pytest.raises(ValueError, match="only background"):
        plain.samples()
