"""The banded finish step against the full-size one it replaces, and the per-label score rule."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from labeler import SegmenterConfig, StableSeg
from labeler.background import probs_to_mask
from labeler.finish import band_rows, bilinear_rows, finish_scores, row_weights
from labeler.images import to_model_input
from labeler.result import mask_dtype
from labeler.sar import normalise
from labeler.scores import LabelScores, label_scores

DEMO = Path(__file__).resolve().parents[1] / "demo"
ODD_SIZES = [(1, 1), (3, 517), (1001, 7), (640, 480), (37, 50), (64, 64)]  # (H, W)


def reference_finish(
    scores: torch.Tensor,
    size: tuple[int, int],
    labels: list[str],
    background_threshold: float | None,
    background_channel: bool,
    evidence: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """``StableSeg._finish`` as it was before the banded finish: full-size probabilities (and
    evidence), per-label loop. Returns (mask, probs, scores)."""
    height, width = size
    probs = F.interpolate(
        scores[None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[0]  # (C, H, W)
    probs = normalise(probs, dim=0)
    full_evidence = None
    if evidence is not None:
        full_evidence = F.interpolate(
            evidence[None].float(), size=(height, width), mode="bilinear", align_corners=False
        )[0]  # (labels, H, W)
    mask = probs_to_mask(probs, background_channel, full_evidence, background_threshold)
    if background_channel:
        probs = probs[: len(labels)]
    confidences = {}
    for k, label in enumerate(labels, start=1):
        won = mask == k
        confidences[label] = float(probs[k - 1][won].mean()) if bool(won.any()) else 0.0
    mask_array = mask.cpu().numpy().astype(mask_dtype(len(labels)))
    return mask_array, probs.cpu().numpy().astype(np.float32), confidences


def near_tie(
    ref_probs_full: np.ndarray, threshold: float | None, evidence_full: np.ndarray | None = None
) -> np.ndarray:
    """(H, W) pixels whose two best probabilities, or a label's evidence and the threshold,
    are within 1e-5."""
    top = np.sort(ref_probs_full, axis=0)
    close = top[-1] - top[-2] < 1e-5 if len(top) > 1 else np.zeros(top.shape[1:], bool)
    if threshold is not None and evidence_full is not None:
        close |= (np.abs(evidence_full - threshold) < 1e-5).any(axis=0)
    return close


def _full_probs(scores: torch.Tensor, size: tuple[int, int], normalised: bool = True) -> np.ndarray:
    up = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    return (normalise(up, dim=0) if normalised else up).numpy()


def check_against_reference(
    scores, size, labels, threshold, background_channel, band_bytes, evidence=None
):
    """Banded finish vs the reference on the same scores: masks equal except at near-ties,
    probabilities and confidences equal up to rounding. Returns the differing-pixel count."""
    ref_mask, ref_probs, ref_scores = reference_finish(
        scores, size, labels, threshold, background_channel, evidence
    )
    out = finish_scores(
        scores,
        size,
        labels,
        threshold,
        background_channel,
        True,
        band_bytes=band_bytes,
        evidence=evidence,
    )
    assert out.mask.dtype == ref_mask.dtype and out.mask.shape == ref_mask.shape
    differ = out.mask != ref_mask
    if differ.any():
        full_evidence = None if evidence is None else _full_probs(evidence, size, normalised=False)
        assert near_tie(_full_probs(scores, size), threshold, full_evidence)[differ].all()
    np.testing.assert_allclose(out.probs, ref_probs, rtol=0, atol=1e-6)
    assert out.scores == pytest.approx(ref_scores, rel=1e-5, abs=1e-7)
    plain = finish_scores(
        scores,
        size,
        labels,
        threshold,
        background_channel,
        band_bytes=band_bytes,
        evidence=evidence,
    )
    assert plain.probs is None
    np.testing.assert_array_equal(plain.mask, out.mask)  # return_probs changes nothing else
    assert plain.scores == out.scores
    return int(differ.sum())


# ---------------------------------------------------------------------------- upsampling
@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("source", [8, 32, 64])
def test_row_weights_are_the_kernels(size, source):
    """Each output row's source rows and weights equal what F.interpolate uses: probe it with
    indicator columns (an output row of the probe is exactly the weight of that source row)."""
    height = size[0]
    weights = row_weights(source, height)
    probe = torch.eye(source)[:, None, :, None]  # (S, 1, S, 1): column j is 1 at source row j
    picked = F.interpolate(probe, size=(height, 1), mode="bilinear", align_corners=False)
    picked = picked[:, 0, :, 0].numpy()  # (S, H): weight of source row j in output row i
    expected = np.zeros((source, height), np.float32)
    rows = np.arange(height)
    np.add.at(expected, (weights.first, rows), weights.first_weight)
    np.add.at(expected, (weights.second, rows), weights.second_weight)
    # Same rows; weights equal up to the rounding of the source position (one float32 step).
    np.testing.assert_array_equal(expected > 0, picked > 0)
    np.testing.assert_allclose(expected, picked, rtol=0, atol=source * 2.0**-23)


@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("channels", [1, 5, 40])
def test_bands_equal_f_interpolate(size, channels):
    """Bands of 1, 7 and all rows, put together, give F.interpolate's values."""
    height, width = size
    torch.manual_seed(height * 7 + width)
    scores = torch.rand(channels, 32, 32) * 2  # (C, S, S)
    expected = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    weights = row_weights(32, height)
    for rows in (1, 7, height):
        bands = [
            bilinear_rows(scores, weights, width, start, min(start + rows, height))
            for start in range(0, height, rows)
        ]
        got = torch.cat(bands, dim=1)  # (C, H, W)
        # A wrong source row or scale is off by ~1e-2; rounding of the blend and of the
        # source position by ~1e-6 at most.
        torch.testing.assert_close(got, expected, rtol=0, atol=4e-6)


def test_band_rows_respect_the_budget():
    assert band_rows(150, 4000) * (4 * 150) * 4000 <= 64 * 2**20
    assert band_rows(5, 4000) >= 1 and band_rows(10_000, 100_000, band_bytes=1) == 1


# ---------------------------------------------------------------------------- finish vs reference
@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    ("threshold", "background_channel"), [(None, False), (0.45, False), (None, True), (0.4, True)]
)
def test_finish_matches_the_reference_on_synthetic_scores(size, threshold, background_channel):
    """Random scores with exact ties, all-zero pixels and negative values (clamped), in
    several bands: masks, probabilities and confidences as the full-size reference gives."""
    torch.manual_seed(size[0] + size[1])
    labels = ["a", "b", "c", "d"]
    channels = len(labels) + int(background_channel)
    scores = torch.rand(channels, 16, 16) - 0.2  # some negative scores
    scores[:, 0, 0] = 0.0  # a pixel with no score at all
    scores[1, 3] = scores[2, 3]  # an exact tie along a row
    evidence = torch.rand(len(labels), 16, 16) if threshold is not None else None
    band_bytes = 4 * channels * size[1] * 3  # about 3 rows a band
    check_against_reference(
        scores, size, labels, threshold, background_channel, band_bytes, evidence
    )


def test_a_label_with_no_pixel_scores_zero():
    scores = torch.zeros(3, 4, 4)
    scores[0] = 1.0  # label "a" wins everywhere
    out = finish_scores(scores, (5, 6), ["a", "b", "c"], None, False)
    assert (out.mask == 1).all()
    assert out.scores == {"a": 1.0, "b": 0.0, "c": 0.0}


def test_more_than_254_labels_give_a_uint16_mask():
    labels = [f"x{i}" for i in range(300)]
    scores = torch.rand(300, 8, 8) * 0.1
    scores[299, :4] = 5.0  # label 300 wins the top half
    scores[0, 4:] = 5.0  # label 1 the bottom half
    out = finish_scores(scores, (9, 11), labels, None, False, band_bytes=4 * 300 * 11 * 2)
    assert out.mask.dtype == np.uint16
    assert {int(v) for v in np.unique(out.mask)} == {1, 300}
    ref_mask, _, ref_scores = reference_finish(scores, (9, 11), labels, None, False)
    np.testing.assert_array_equal(out.mask, ref_mask)
    assert out.scores == pytest.approx(ref_scores, rel=1e-5)


@pytest.fixture(scope="module")
def demo_scores():
    """The demo model's final scores (C', S, S) on the demo scenes, three configurations."""
    labels = (DEMO / "scenes" / "colours.txt").read_text().split()
    paths = sorted((DEMO / "scenes" / "images").glob("*.png"))[:40]
    rgbs = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    configs = {
        "background prompt": SegmenterConfig(image_size=64, background_prompt="background"),
        "every pixel a label": SegmenterConfig(image_size=64),
        "threshold": SegmenterConfig(image_size=64, background_threshold=0.4),
    }
    out = {}
    for name, config in configs.items():
        model = StableSeg.from_pretrained(DEMO / "model", device="cpu", config=config)
        prompts = model._prompts(model.prompt_labels(labels))
        latents = model.encode_images(to_model_input(rgbs, config.image_size))
        result = model._attention_pass(latents, prompts, model.plan())
        out[name] = (model, result.final, result.evidence, rgbs, labels)  # final (B, C', S, S)
        model.close()
    return out


@pytest.mark.parametrize("config", ["background prompt", "every pixel a label", "threshold"])
def test_demo_scenes_match_the_reference(demo_scores, config):
    """On the demo scenes (64 x 64) and the first of them at odd sizes, through the
    segmenter's own finish step, with bands of a few rows."""
    model, final, evidence, rgbs, labels = demo_scores[config]
    threshold = model.config.background_threshold
    background = model.config.background_prompt is not None
    channels = final.shape[1]
    cases = [(i, rgb.shape[:2]) for i, rgb in enumerate(rgbs)]
    cases += list(enumerate(ODD_SIZES))
    differing = 0
    for i, size in cases:
        budget = 4 * channels * size[1] * 5  # 5-row bands
        ev = None if evidence is None else evidence[i]
        differing += check_against_reference(
            final[i], size, labels, threshold, background, budget, ev
        )
    assert differing <= 5  # near-ties only (measured: 0)


def test_segment_uses_the_banded_finish(demo_scores):
    """segment() end to end: masks and scores as the reference finish of the same scores."""
    model, final, _, rgbs, labels = demo_scores["background prompt"]
    model.band_bytes = 4 * final.shape[1] * 64 * 3
    results = model.segment(rgbs[:4], labels, return_probs=True)
    for result, scores, rgb in zip(results, final, rgbs, strict=False):
        ref_mask, ref_probs, ref_scores = reference_finish(
            scores, rgb.shape[:2], labels, None, True
        )
        np.testing.assert_array_equal(result.mask, ref_mask)
        np.testing.assert_allclose(result.probs, ref_probs, rtol=0, atol=1e-6)
        assert result.scores == pytest.approx(ref_scores, rel=1e-5)
    model.close()


# ---------------------------------------------------------------------------- the score rule
def test_label_scores_rule():
    labels = ["a", "b", "c"]
    mask = np.array([[1, 1, 2], [0, 255, 2]], np.uint8)  # 0 background, 255 ignore, no "c"
    probs = np.array(
        [
            [[0.6, 0.8, 0.1], [0.5, 0.9, 0.2]],
            [[0.3, 0.1, 0.7], [0.2, 0.05, 0.5]],
            [[0.1, 0.1, 0.2], [0.3, 0.05, 0.3]],
        ],
        np.float32,
    )
    expected = {"a": np.float32(0.7), "b": np.float32(0.6), "c": 0.0}
    assert label_scores(mask, probs, labels) == pytest.approx(expected, rel=1e-6)
    tensors = label_scores(torch.from_numpy(mask), torch.from_numpy(probs), labels)
    assert tensors == label_scores(mask, probs, labels)
    # Row by row, with the winners' probabilities given: the same.
    pieces = LabelScores(labels)
    for row in range(2):
        pieces.add(mask[row], probs[:, row])
    assert pieces.result() == label_scores(mask, probs, labels)
    channel = np.where((mask >= 1) & (mask <= 3), mask.astype(np.int64) - 1, 0)  # (H, W)
    won = torch.from_numpy(np.take_along_axis(probs, channel[None], 0)[0])
    winners = LabelScores(labels).add_winners(torch.from_numpy(mask), won)
    assert winners.result() == label_scores(mask, probs, labels)
    with pytest.raises(ValueError, match="probs"):
        label_scores(mask, probs[:2], labels)


@pytest.mark.gpu
@pytest.mark.parametrize("labels", [5, 300])
def test_finish_on_cuda_matches_the_cpu(labels):
    """The banded finish on the GPU (pinned row weights, device masks, uint16 past 254 labels)
    gives the CPU's masks and confidences."""
    torch.manual_seed(0)
    names = [f"x{i}" for i in range(labels)]
    scores = torch.rand(labels, 64, 64)  # (C, S, S)
    for size in [(1, 1), (777, 1001), (1001, 7)]:
        evidence = torch.rand(labels, 64, 64)
        cpu = finish_scores(scores, size, names, 0.01, False, True, evidence=evidence)
        gpu = finish_scores(scores.cuda(), size, names, 0.01, False, True, evidence=evidence.cuda())
        assert gpu.mask.dtype == cpu.mask.dtype
        assert (gpu.mask != cpu.mask).mean() < 1e-4
        assert gpu.scores == pytest.approx(cpu.scores, rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(gpu.probs, cpu.probs, rtol=0, atol=1e-5)
