"""DenseCRF refinement: boundaries snap to image edges, probabilities stay normalised."""

from __future__ import annotations

import numpy as np
import pytest

from labeler.crf import CRFConfig, dense_crf
from labeler.train.pseudo import pseudo_mask
from labeler.train.trainer_settings import PseudoConfig

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is not installed")

HEIGHT, WIDTH = 48, 64
EDGE = 37  # true boundary column: columns < EDGE are dark, the rest bright
OFFSET = 8  # the probabilities put the boundary this many pixels too far left


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, probs (2, H, W) float32, true mask (H, W) with ids 1 / 2)."""
    rng = np.random.default_rng(seed)
    image = np.full((HEIGHT, WIDTH, 3), 40, dtype=np.int64)
    image[:, EDGE:] = 210
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)

    columns = np.arange(WIDTH)
    right = 1.0 / (1.0 + np.exp(-(columns - (EDGE - OFFSET)) / 4.0))  # (W,) blurry sigmoid
    right = np.broadcast_to(right, (HEIGHT, WIDTH)) + rng.normal(0.0, 0.1, (HEIGHT, WIDTH))
    right = np.clip(right, 0.02, 0.98)  # (H, W)
    probs = np.stack([1.0 - right, right]).astype(np.float32)  # (2, H, W)

    truth = np.where(columns < EDGE, 1, 2)[None, :].repeat(HEIGHT, axis=0)  # (H, W)
    return image, probs, truth


def test_boundary_moves_to_the_image_edge() -> None:
    image, probs, truth = _scene()
    before = probs.argmax(axis=0) + 1  # (H, W)
    after = dense_crf(image, probs).argmax(axis=0) + 1  # (H, W)
    agreement_before = (before == truth).mean()
    agreement_after = (after == truth).mean()
    assert agreement_before < 0.9  # the input really is off by several pixels
    assert agreement_after > agreement_before + 0.08
    assert agreement_after > 0.97
    # Per row, the first "right" column lies within 2 px of the true edge.
    first_right = (after == 2).argmax(axis=1)  # (H,)
    assert np.abs(np.median(first_right) - EDGE) <= 2


def test_refined_probabilities_are_normalised() -> None:
    image, probs, _ = _scene(seed=1)
    refined = dense_crf(image, probs, CRFConfig(iterations=3))
    assert refined.shape == probs.shape
    assert refined.dtype == np.float32
    assert (refined >= 0).all()
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-4)


def test_zero_probabilities_are_clipped_not_fatal() -> None:
    image, _, truth = _scene(seed=2)
    hard = np.stack([truth == 1, truth == 2]).astype(np.float32)  # one-hot, exact zeros
    refined = dense_crf(image, hard)
    assert np.isfinite(refined).all()
    np.testing.assert_array_equal(refined.argmax(axis=0) + 1, truth)


def test_uncertain_pixels_become_ignore() -> None:
    image, probs, _ = _scene(seed=3)
    refined = dense_crf(image, probs)
    threshold = float(np.quantile(refined.max(axis=0), 0.2))
    mask = pseudo_mask(image, probs, PseudoConfig(uncertain_threshold=threshold))
    expected_ignored = refined.max(axis=0) < threshold
    assert expected_ignored.any()
    np.testing.assert_array_equal(mask == 255, expected_ignored)
    assert set(np.unique(mask[~expected_ignored])) <= {1, 2}
    kept = pseudo_mask(image, probs, PseudoConfig(uncertain_threshold=0.0))
    assert not (kept == 255).any()  # threshold 0 keeps every pixel


def test_config_and_input_validation() -> None:
    image, probs, _ = _scene()
    with pytest.raises(ValueError, match="iterations"):
        CRFConfig(iterations=0)
    with pytest.raises(ValueError, match="bilateral_srgb"):
        CRFConfig(bilateral_srgb=0)
    with pytest.raises(ValueError, match="does not match image"):
        dense_crf(image[:10], probs)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="uncertain_threshold"):
        PseudoConfig(uncertain_threshold=1.5)
    with pytest.raises(AttributeError):
        CRFConfig().iterations = 3  # frozen
