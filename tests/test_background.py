"""The background rules: a threshold whose meaning does not depend on the label count, the
background prompt, and the (1 + C) distribution CRF takes, whose argmax is the rules' mask."""

import numpy as np
import pytest
import torch

from labeler import SegmenterConfig, StableSeg
from labeler.background import background_first, label_evidence, probs_to_mask

from .conftest import TINY_SIZE


def test_evidence_is_each_labels_attention_over_its_own_peak():
    attention = torch.tensor([[[[0.1, 0.4], [0.2, 0.8]], [[0.05, 0.05], [0.01, 0.02]]]])
    evidence = label_evidence(attention)  # (1, 2, 2, 2)
    torch.testing.assert_close(evidence[0, 0], torch.tensor([[0.125, 0.5], [0.25, 1.0]]))
    torch.testing.assert_close(evidence[0, 1], torch.tensor([[1.0, 1.0], [0.2, 0.4]]))


def test_a_single_label_can_have_background():
    """With one label its probability is 1 everywhere: a threshold on probabilities could
    never make background; the evidence does."""
    probs = torch.ones(1, 2, 3)
    evidence = torch.tensor([[[0.9, 0.2, 0.6], [0.1, 1.0, 0.49]]])
    mask = probs_to_mask(probs, evidence=evidence, threshold=0.5)
    torch.testing.assert_close(mask, torch.tensor([[1, 0, 1], [0, 1, 0]]))


def test_every_label_is_measured_against_its_own_peak_whatever_the_label_count(tiny_parts):
    """Probabilities spread as labels are added (their best value falls towards 1/C); each
    label's evidence keeps the [0, 1] scale of its own peak, and the mask follows it."""
    image = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    config = SegmenterConfig(image_size=TINY_SIZE, background_threshold=0.0)
    model = StableSeg(**tiny_parts, config=config)
    for count in (1, 3, 12):
        labels = [f"w{i}" for i in range(count)]
        result = model.segment(image, labels, return_probs=True)[0]
        assert result.evidence is not None and result.evidence.shape == result.mask.shape
        assert result.evidence.min() >= 0.0 and result.evidence.max() <= 1.0 + 1e-6
        threshold = float(np.median(result.evidence))
        strict = model.with_config(config.replace(background_threshold=threshold))
        mask = strict.segment(image, labels)[0].mask
        np.testing.assert_array_equal(mask == 0, result.evidence < threshold)
        assert 0.2 < (mask == 0).mean() < 0.8  # a threshold at the median: about half
        if count == 1:
            np.testing.assert_allclose(result.probs, 1.0)  # no probability threshold could help
    model.close()


@pytest.mark.parametrize(
    ("prompt", "threshold"), [(False, None), (True, None), (False, 0.5), (True, 0.5)]
)
def test_crf_input_argmax_is_the_rules_mask(prompt, threshold):
    rng = np.random.default_rng(1)
    labels, height, width = 4, 9, 11
    channels = labels + int(prompt)
    scores = rng.random((channels, height, width)).astype(np.float32)
    full = scores / scores.sum(axis=0)  # (C', H, W) normalised over every prompted class
    evidence = rng.random((labels, height, width)).astype(np.float32)
    expected = probs_to_mask(
        torch.from_numpy(full),
        background_channel=prompt,
        evidence=torch.from_numpy(evidence),
        threshold=threshold,
    ).numpy()
    label_probs = full[:labels]
    winner = np.take_along_axis(evidence, label_probs.argmax(axis=0)[None], axis=0)[0]
    extended = background_first(
        label_probs,
        full[labels] if prompt else None,
        winner if threshold is not None else None,
        threshold,
    )  # (1 + C, H, W)
    np.testing.assert_allclose(extended.sum(axis=0), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(extended.argmax(axis=0), expected)
    if not prompt and threshold is None:
        assert (extended[0] == 0).all()  # no rule: background never wins


def test_a_threshold_without_evidence_is_an_error():
    with pytest.raises(ValueError, match="evidence"):
        probs_to_mask(torch.ones(2, 2, 2), threshold=0.5)
    with pytest.raises(ValueError, match="evidence"):
        background_first(np.ones((2, 2, 2), np.float32), threshold=0.5)
