"""Label presence, test-time ensembles and iterative SAR: their maths on hand-made tensors, their
wiring on the tiny model, and the open setting's quality on the demo model."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from labeler import SegmenterConfig, StableSeg
from labeler.jobs.sweep import parse_sweep, sweep_points
from labeler.presence import best_ratio, gate, judge_presence, layer_sharpness, presence_evidence

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- presence maths
def _layer(*cells: list[float]) -> torch.Tensor:
    """(1, C, 1, N) a layer's map from N cells' distributions over C classes."""
    return torch.tensor(cells, dtype=torch.float32).T[None, :, None, :]


def test_best_ratio_is_one_for_a_label_that_wins_a_cell() -> None:
    layer = _layer([0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4])  # 3 cells, 3 classes
    ratios = best_ratio(layer)[0]
    torch.testing.assert_close(ratios, torch.tensor([1.0, 1.0, 0.8]))


def test_the_evidence_does_not_depend_on_the_number_of_labels() -> None:
    # Adding labels that never win anywhere leaves the others' evidence as it was.
    few = _layer([0.6, 0.3], [0.2, 0.7])
    many = torch.cat([few, 0.05 * torch.ones(1, 8, 1, 2)], dim=1)
    torch.testing.assert_close(best_ratio(many)[0, :2], best_ratio(few)[0])


def test_the_sharpest_layer_decides() -> None:
    flat = _layer([0.34, 0.33, 0.33], [0.33, 0.34, 0.33])  # label 2 wins nowhere, all alike
    sharp = _layer([0.9, 0.05, 0.05], [0.05, 0.05, 0.9])  # label 1 wins nowhere
    assert layer_sharpness(sharp)[0] < layer_sharpness(flat)[0]
    maps = {"flat": flat, "sharp": sharp}
    evidence = presence_evidence(maps, {"flat": 0.5, "sharp": 0.5})
    torch.testing.assert_close(evidence, best_ratio(sharp))
    # A layer without weight is not read.
    torch.testing.assert_close(
        presence_evidence(maps, {"flat": 1.0, "sharp": 0.0}), best_ratio(flat)
    )


def test_judge_keeps_the_strongest_label_and_the_background_prompt() -> None:
    evidence = torch.tensor([[0.2, 0.9, 0.4, 0.1], [1.0, 0.95, 0.3, 0.0]])  # 3 labels + bg
    present = judge_presence(evidence, threshold=1.0, num_labels=3)
    expected = torch.tensor([[False, True, False, True], [True, False, False, True]])
    assert torch.equal(present, expected)
    assert judge_presence(evidence, 0.0, 3).all()


def test_gate_fills_absent_channels() -> None:
    scores = torch.arange(12, dtype=torch.float32).view(1, 3, 2, 2)
    present = torch.tensor([[True, False, True]])
    gated = gate(scores, present, -1.0)
    assert (gated[0, 1] == -1).all()
    torch.testing.assert_close(gated[0, [0, 2]], scores[0, [0, 2]])


# ---------------------------------------------------------------------- on the tiny model
def _image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_flip_ensemble_is_mirror_symmetric(tiny_model: StableSeg) -> None:
    # Without the maps mirrored back, segmenting the mirrored image would not give the mirrored
    # masks: with them, the two members of the ensemble just swap.
    model = tiny_model.with_config(tiny_model.config.replace(flip=True))
    labels = ["cat", "dog", "tree"]
    image = _image(1)
    (plain,) = model.segment(image, labels, return_probs=True)
    (mirrored,) = model.segment(image[:, ::-1].copy(), labels, return_probs=True)
    np.testing.assert_allclose(mirrored.probs, plain.probs[:, :, ::-1], atol=1e-5)
    (single,) = tiny_model.segment(image, labels, return_probs=True)
    assert not np.allclose(single.probs, plain.probs, atol=1e-4)


def test_timestep_and_template_ensembles_average_the_members(tiny_model: StableSeg) -> None:
    labels = ["cat", "dog"]
    base = tiny_model.config
    model = tiny_model.with_config(
        base.replace(ensemble_timesteps=(50,), ensemble_templates=("a photo of {}",))
    )
    assert len(model.views()) == 4
    plan = model.plan()
    pixels, _ = model._model_input([_image(2)], 0)
    latents = model.encode_images(pixels)
    members = []
    for template in ("{}", "a photo of {}"):
        for step in (1, 50):
            prompts = model._prompts(labels, template)
            members.append(model._attention_pass(latents, prompts, plan, step).final)
    averaged = model._ensemble_pass(pixels, labels, plan).final
    torch.testing.assert_close(averaged, sum(members) / 4, rtol=1e-5, atol=1e-6)


def test_presence_gates_sar_and_the_argmax(tiny_model: StableSeg) -> None:
    labels = ["cat", "dog", "tree", "house"]
    model = tiny_model.with_config(tiny_model.config.replace(presence_threshold=1.0))
    plan = model.plan()
    pixels, _ = model._model_input([_image(3), _image(4)], 0)
    latents = model.encode_images(pixels)
    result = model._attention_pass(latents, model._prompts(labels), plan)
    assert result.present is not None and result.present.any(dim=1).all()
    for image, label in (~result.present).nonzero().tolist():
        assert (result.final[image, label] == 0).all()
        # SAR gives an absent label no class vector, so no probability.
        for name, weight in plan.self_.items():
            if weight:
                assert (result.layer_maps[name][image, label] == 0).all()
    # Threshold 0 keeps every label: the paper's method.
    everything = tiny_model.with_config(tiny_model.config.replace(presence_threshold=0.0))
    loose = everything._attention_pass(latents, everything._prompts(labels), plan)
    plain = tiny_model._attention_pass(latents, tiny_model._prompts(labels), plan)
    torch.testing.assert_close(loose.final, plain.final)


def _counted(method, calls: list[int], *args, **kwargs):
    """``method(*args, **kwargs)``, noting the call in ``calls``."""
    calls.append(1)
    return method(*args, **kwargs)


def test_reprompt_segments_each_image_with_its_present_labels(tiny_model: StableSeg) -> None:
    labels = ["cat", "dog", "tree", "house", "car", "boat"]
    config = tiny_model.config.replace(presence_threshold=0.99, background_prompt="background")
    judge = tiny_model.with_config(config)
    model = tiny_model.with_config(config.replace(reprompt=True))
    prompted = model.prompt_labels(labels)
    plan = model.plan()
    # Three images with three label sets, one of them every label (its judging pass is reused).
    pool = [_image(seed) for seed in range(12)]
    pool_present = judge._ensemble_pass(model._model_input(pool, 0)[0], prompted, plan).present
    assert pool_present is not None
    chosen: dict[tuple[bool, ...], int] = {}
    for index, row in enumerate(pool_present.tolist()):
        chosen.setdefault(tuple(row), index)
    every = (True,) * len(prompted)
    assert every in chosen and len(chosen) >= 3, pool_present
    picks = [chosen[every], *[i for p, i in chosen.items() if p != every][:2]]
    images = [pool[i] for i in picks]
    pixels, _ = model._model_input(images, 0)
    judged = judge._ensemble_pass(pixels, prompted, plan)
    assert judged.present is not None
    # With one member and with two (the mirrored image too), whose first member judges.
    for extra in ({}, {"flip": True}):
        reprompting = model.with_config(model.config.replace(**extra))
        counted: list[int] = []
        reprompting._attention_pass = functools.partial(  # type: ignore[method-assign]
            _counted, reprompting._attention_pass, counted
        )
        result = reprompting._ensemble_pass(pixels, prompted, plan)
        assert result.present is not None
        torch.testing.assert_close(result.present, judged.present)
        assert len({tuple(row) for row in result.present.tolist()}) == 3
        # One pass a member for each label set: the judging pass is the first member's for the
        # image that keeps every label.
        assert len(counted) == 3 * len(reprompting.views())
        plain = tiny_model.with_config(config.replace(presence_threshold=None, **extra))
        for index, row in enumerate(result.present.tolist()):
            keep = [c for c, on in enumerate(row) if on]
            alone = plain._ensemble_pass(
                pixels[index : index + 1], [prompted[c] for c in keep], plan
            )
            # Its own pass, prompted with only the labels it keeps (and the background prompt)
            torch.testing.assert_close(
                result.final[index, keep], alone.final[0], rtol=1e-4, atol=1e-6
            )
            for name, layer_map in alone.layer_maps.items():
                torch.testing.assert_close(
                    result.layer_maps[name][index, keep], layer_map[0], rtol=1e-4, atol=1e-6
                )
            # ... and nothing for the labels left out.
            left_out = [c for c, on in enumerate(row) if not on]
            assert (result.final[index, left_out] == 0).all()
        # Images that keep every label: the judging pass is the first member's.
        everything = reprompting.with_config(reprompting.config.replace(presence_threshold=0.0))
        passes: list[int] = []
        everything._attention_pass = functools.partial(  # type: ignore[method-assign]
            _counted, everything._attention_pass, passes
        )
        torch.testing.assert_close(
            everything._ensemble_pass(pixels, prompted, plan).final,
            plain._ensemble_pass(pixels, prompted, plan).final,
        )
        assert len(passes) == len(reprompting.views())  # no pass more than without reprompt
        masks = [r.mask for r in reprompting.segment(images, labels)]
        for mask, row in zip(masks, result.present.tolist()):
            absent = {c + 1 for c, on in enumerate(row[: len(labels)]) if not on}
            assert not absent & set(np.unique(mask).tolist())


def test_reprompt_needs_labels_to_leave_out() -> None:
    with pytest.raises(ValueError, match="reprompt needs presence_threshold or tiles"):
        SegmenterConfig(reprompt=True)
    assert "reprompt" not in SegmenterConfig(presence_threshold=0.5).mask_settings()
    assert SegmenterConfig(presence_threshold=0.5, reprompt=True).mask_settings()["reprompt"]
    SegmenterConfig(tiles=2, reprompt=True)


def test_sar_rounds_reseed_from_the_refined_map(tiny_model: StableSeg) -> None:
    labels = ["cat", "dog", "tree"]
    image = _image(5)
    (one,) = tiny_model.segment(image, labels, return_probs=True)
    two_model = tiny_model.with_config(tiny_model.config.replace(sar_rounds=2))
    (two,) = two_model.segment(image, labels, return_probs=True)
    (again,) = two_model.segment(image, labels, return_probs=True)
    np.testing.assert_array_equal(two.probs, again.probs)
    assert not np.allclose(one.probs, two.probs)


def test_settings_and_sweep_keys() -> None:
    config = SegmenterConfig(ensemble_timesteps="50, 100", ensemble_templates="a {}|the {}")
    assert config.ensemble_timesteps == (50, 100)
    assert config.ensemble_templates == ("a {}", "the {}")
    with pytest.raises(ValueError, match="exactly once"):
        SegmenterConfig(ensemble_templates=("no slot",))
    with pytest.raises(ValueError, match="sar_rounds"):
        SegmenterConfig(sar_rounds=0)
    axes = parse_sweep(["presence=off,1 flip=off,on", "timesteps=1,1+50", "sar-rounds=1,2"])
    points = sweep_points(SegmenterConfig(), axes)
    assert len(points) == 16
    last = points[-1].config
    assert last.presence_threshold == 1.0 and last.flip and last.sar_rounds == 2
    assert (last.timestep, last.ensemble_timesteps) == (1, (50,))
    with pytest.raises(ValueError, match="presence"):
        parse_sweep(["presence=2"])


# ---------------------------------------------------------------------- the open setting, demo
OPEN_SCENES = 50
# mIoU (percent) of the first OPEN_SCENES shipped scenes (docs/benchmark.md "What to try on your
# data"), every colour prompted ("open") or only the image's own ("per image", the paper's
# protocol). The guard allows 2 points less; presence with reprompt must keep its lead in the
# open setting and cost the per-image protocol at most the 0.5.
PRESENCE = {"presence_threshold": 0.5, "reprompt": True}
OPEN_MEASURED = {
    ("open", "every label"): 71.7,
    ("open", "presence"): 74.8,
    ("per image", "every label"): 76.3,
    ("per image", "presence"): 76.3,
}


@pytest.mark.slow
def test_presence_in_the_open_setting_on_the_demo() -> None:
    from demo.evaluate import load_demo_config, mean_iou
    from demo.scenes import read_scene_set

    torch.set_num_threads(2)
    model_dir = ROOT / "demo" / "model"
    config = load_demo_config(model_dir)
    model = StableSeg.from_pretrained(model_dir, device="cpu", dtype=torch.float32, config=config)
    _, images, gts, labels = read_scene_set(ROOT / "demo" / "scenes")
    images, gts = images[:OPEN_SCENES], gts[:OPEN_SCENES]
    scores = {}
    for row, changes in (("every label", {}), ("presence", PRESENCE)):
        segmenter = model.with_config(config.replace(**changes))
        masks = [result.mask for result in segmenter.segment(images, labels)]
        scores["open", row] = mean_iou(masks, gts, labels)["mIoU"]
        own = []  # each image prompted with the colours of its ground truth, mask ids remapped
        for image, gt in zip(images, gts):
            ids = [k for k in range(1, len(labels) + 1) if (gt == k).any()]
            (result,) = segmenter.segment(image, [labels[k - 1] for k in ids])
            own.append(np.array([0, *ids], dtype=np.uint8)[result.mask])
        scores["per image", row] = mean_iou(own, gts, labels)["mIoU"]
    for key, measured in OPEN_MEASURED.items():
        assert scores[key] >= measured - 2.0, scores
    assert scores["open", "presence"] >= scores["open", "every label"] + 1.5, scores
    assert scores["per image", "presence"] >= scores["per image", "every label"] - 0.5, scores
