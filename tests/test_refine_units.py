"""The refine trainer's parts: augmentation, pseudo-masks from the cache, CRF, loop, student."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labeler import SegmentationResult
from labeler.result import share_key
from labeler.train.cache import maps_from_bytes, maps_to_bytes
from labeler.train.data import PseudoMaskDataset, augment, work_size
from labeler.train.loop import masked_cross_entropy, poly_lr, train_student
from labeler.train.model import (
    STUDENT_META_FILE,
    EncoderWeightsUnavailable,
    build_student,
    student_metadata,
)
from labeler.train.pseudo import mask_from_maps, probs_from_maps, pseudo_mask
from labeler.train.student import load_student, student_segment
from labeler.train.trainer_settings import PseudoConfig, StudentConfig

from .refine_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _scene(height: int = 40, width: int = 56, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) with ids 1 left half / 2 right half)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, width // 2 :] = 200
    image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
    mask = np.ones((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 2
    return image, mask


# ---------------------------------------------------------------------------- data
def test_augment_crops_pads_with_ignore_and_is_reproducible() -> None:
    image, mask = _scene()
    out_image, out_mask = augment(image, mask, 64, (0.5, 0.5), True, np.random.default_rng(3))
    assert out_image.shape == (64, 64, 3) and out_mask.shape == (64, 64)
    assert out_image.dtype == np.uint8 and out_mask.dtype == np.uint8
    # At half scale the image covers 32 x 23 pixels of the 64 x 64 crop: the rest is padding.
    assert (out_mask == 255).mean() > 0.7
    assert set(np.unique(out_mask)) <= {1, 2, 255}
    again = augment(image, mask, 64, (0.5, 0.5), True, np.random.default_rng(3))
    np.testing.assert_array_equal(again[1], out_mask)
    _, big_mask = augment(image, mask, 32, (2.0, 2.0), False, np.random.default_rng(0))
    assert big_mask.shape == (32, 32) and (big_mask != 255).all()  # upscaled: no padding


def test_dataset_depends_on_seed_epoch_and_index_only() -> None:
    sources = [lambda s=s: _scene(seed=s) for s in range(3)]
    dataset = PseudoMaskDataset(sources, crop=32)
    first = dataset[1]
    assert first[0].shape == (3, 32, 32) and first[0].dtype == torch.float32
    assert first[1].shape == (32, 32) and first[1].dtype == torch.int64
    torch.testing.assert_close(dataset[1][0], first[0])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1][0], first[0])
    with pytest.raises(ValueError, match="empty"):
        PseudoMaskDataset([], crop=32)


def test_work_size_caps_the_longer_side() -> None:
    assert work_size(4000, 3000, 1024) == (1024, 768)
    assert work_size(300, 200, 1024) == (300, 200)


# ---------------------------------------------------------------------------- pseudo-masks
def test_probs_from_cached_maps_reproduce_stableseg(tiny_model) -> None:
    """Stage 1 caches only the layer maps: rebuilding from them gives StableSeg's own output."""
    image, _ = _scene(37, 50)
    labels = ["cat", "dog", "traffic light"]
    result = tiny_model.segment([image], labels, return_probs=True, return_layer_maps=True)[0]
    plan = tiny_model.plan()
    cached, info = maps_from_bytes(maps_to_bytes(result.layer_maps, labels, (50, 37)))
    assert info["labels"] == labels and info["image_size"] == (50, 37)
    layers = {layer.name for layer in tiny_model.attention_layers()}
    shares = {
        share_key(layer.name) for layer in tiny_model.attention_layers() if layer.kind == "cross"
    }
    assert set(cached) == layers | shares
    assert all(m.dtype == np.float16 for m in cached.values())
    probs = probs_from_maps(cached, plan.cross, plan.self_, plan.common_size, (50, 37))
    assert probs.shape == result.probs.shape
    np.testing.assert_allclose(probs, result.probs, atol=2e-3)  # fp16 cache
    agree = (probs.argmax(axis=0) + 1 == result.mask).mean()
    assert agree > 0.99


def test_cached_maps_give_the_segmenters_threshold_masks(tiny_model_dir) -> None:
    """The cache carries each cross layer's label share, so the background threshold (on the
    labels' evidence) rebuilt from the cache gives the segmenter's own mask."""
    from labeler import SegmenterConfig, StableSeg

    image, _ = _scene(37, 50)
    labels = ["cat", "dog"]
    probe = SegmenterConfig(image_size=64, background_threshold=0.0)
    model = StableSeg.from_pretrained(tiny_model_dir, device="cpu", config=probe)
    threshold = float(np.median(model.segment([image], labels, return_probs=True)[0].evidence))
    model = model.with_config(probe.replace(background_threshold=threshold))
    result = model.segment([image], labels, return_layer_maps=True)[0]
    cached, _ = maps_from_bytes(maps_to_bytes(result.layer_maps, labels, (50, 37)))
    plan = model.plan()
    mask = mask_from_maps(
        cached,
        (plan.cross, plan.self_),
        plan.common_size,
        (50, 37),
        2,
        background_threshold=threshold,
    )
    assert 0 in mask and (mask > 0).any()  # the threshold makes background, not everything
    assert (mask == result.mask).mean() > 0.99  # fp16 cache
    model.close()


def test_pseudo_mask_ids_and_uncertain_pixels_without_crf() -> None:
    image, _ = _scene(4, 4)
    probs = np.zeros((2, 4, 4), dtype=np.float32)
    probs[0] = np.linspace(0.05, 0.95, 16).reshape(4, 4)
    probs[1] = 1 - probs[0]
    config = PseudoConfig(crf=False, uncertain_threshold=0.8)
    mask = pseudo_mask(image, probs, config)
    assert mask.dtype == np.uint8
    confident = probs.max(axis=0) >= 0.8
    np.testing.assert_array_equal(mask[~confident], 255)
    np.testing.assert_array_equal(mask[confident], probs.argmax(axis=0)[confident] + 1)
    assert PseudoConfig(crf=False).threshold is None and PseudoConfig().threshold == 0.6
    evidence = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)  # winner's evidence
    with_bg = pseudo_mask(
        image, probs, PseudoConfig(crf=False), background_threshold=0.5, evidence=evidence
    )
    np.testing.assert_array_equal(with_bg == 0, evidence < 0.5)  # the evidence decides
    np.testing.assert_array_equal(with_bg[evidence >= 0.5], mask_all(probs)[evidence >= 0.5])


def test_crf_moves_a_background_boundary_to_the_image_edge() -> None:
    """The refine-level addition to test_crf: background (0) is a CRF class like the labels."""
    pytest.importorskip("pydensecrf.densecrf")
    height, width, edge = 32, 64, 40  # dark background left of ``edge``, a bright label right
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 30, dtype=np.int64)
    image[:, edge:] = 220
    image = np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    columns = np.arange(width)
    # Label 1's evidence reaches the background threshold (0.6) about 12 px too early.
    rise = 1 / (1 + np.exp(-(columns - (edge - 10)) / 2.0))  # (W,)
    label = np.broadcast_to(0.5 + 0.4 * rise, (height, width))  # (H, W)
    probs = np.stack([label, 1 - label]).astype(np.float32)  # (2, H, W): label 1 always wins
    evidence = np.ascontiguousarray(label)  # (H, W) the winner's evidence
    truth = np.where(columns >= edge, 1, 0)[None].repeat(height, axis=0)  # (H, W)

    before = pseudo_mask(
        image, probs, PseudoConfig(crf=False), background_threshold=0.6, evidence=evidence
    )
    config = PseudoConfig(crf=True, uncertain_threshold=0.0)
    after = pseudo_mask(image, probs, config, background_threshold=0.6, evidence=evidence)
    assert (before == truth).mean() < 0.85  # the label leaks into the background
    assert (after == truth).mean() > 0.97
    first_label = (after == 1).argmax(axis=1)  # (H,) first label column per row
    assert np.abs(np.median(first_label) - edge) <= 1


# ---------------------------------------------------------------------------- training
def test_poly_schedule_and_ignored_pixels() -> None:
    assert poly_lr(0.01, 0, 100, 0.9) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = masked_cross_entropy(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum().item() == 0.0
    target[0, 0, 0] = 1
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert masked_cross_entropy(logits, target).item() == pytest.approx(expected.item())


def test_config_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        StudentConfig(crop_size=50)
    with pytest.raises(ValueError, match="'imagenet' or None"):
        StudentConfig(encoder_weights="coco")
    with pytest.raises(ValueError, match="unknown encoder 'resnet-9000'"):
        build_student("resnet-9000", None, 2)


def test_missing_imagenet_weights_give_the_offline_hint(monkeypatch) -> None:
    import segmentation_models_pytorch.encoders as encoders
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no network")

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    with pytest.raises(EncoderWeightsUnavailable) as caught:
        build_student("resnet18", "imagenet", 2)
    message = str(caught.value)
    assert "cannot download ImageNet weights" in message
    assert "--encoder-weights none" in message and "cache" in message


def _dataset(count: int = 6) -> PseudoMaskDataset:
    return PseudoMaskDataset([lambda s=s: _scene(seed=s) for s in range(count)], crop=32, seed=1)


def test_resumed_training_repeats_the_uninterrupted_run() -> None:
    config = StudentConfig(
        encoder="resnet18", encoder_weights=None, crop_size=32, epochs=2, train_batch_size=3
    )
    checkpoints: list[dict] = []
    whole = build_student("resnet18", None, 2, seed=0)
    history = train_student(
        whole, _dataset(), config, torch.device("cpu"), None, checkpoints.append
    )
    assert [c["epoch"] for c in checkpoints] == [1, 2]
    assert len(history.step_loss) == 4 and history.epochs_done == 2

    resumed = build_student("resnet18", None, 2, seed=123)  # other init: the checkpoint wins
    torch.manual_seed(999)  # and other RNG state: the checkpoint restores it
    again = train_student(resumed, _dataset(), config, torch.device("cpu"), resume=checkpoints[0])
    assert again.step_loss == history.step_loss
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


# ---------------------------------------------------------------------------- the student
def _save_student(folder, background: bool):
    model = build_student("resnet18", None, 3, seed=0)
    model.save_pretrained(str(folder))
    meta = student_metadata(["cat", "dog", "bird"], background, 64, "resnet18")
    (folder / STUDENT_META_FILE).write_text(json.dumps(meta))
    return model


def test_student_segment_returns_stableseg_results(tmp_path) -> None:
    _save_student(tmp_path, background=False)
    student = load_student(tmp_path, device="cpu")
    assert student.labels == ["cat", "dog", "bird"] and student.image_size == 64
    image, _ = _scene(37, 50)
    result = student_segment(student, [image, image[:20]], None)[0]
    assert isinstance(result, SegmentationResult)
    assert result.mask.shape == (37, 50) and result.mask.dtype == np.uint8
    assert result.probs.shape == (3, 37, 50)
    np.testing.assert_allclose(result.probs.sum(axis=0), 1.0, atol=1e-5)
    assert set(np.unique(result.mask)) <= {1, 2, 3}  # no background without a threshold
    assert set(result.scores) == {"cat", "dog", "bird"}

    # A subset of labels in another order: ids follow the order given, as with StableSeg.
    subset = student_segment(student, image, ["bird", "cat"], image_size=32)[0]
    assert subset.labels == ["bird", "cat"] and subset.probs.shape == (2, 37, 50)
    assert set(np.unique(subset.mask)) <= {1, 2}
    with pytest.raises(ValueError, match="not among the student's labels"):
        student_segment(student, image, ["zebra"])


def test_load_student_refuses_other_folders(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a refine student folder"):
        load_student(tmp_path)


def test_pseudo_mask_with_a_background_prompt_channel() -> None:
    from labeler.train.pseudo import pseudo_mask
    from labeler.train.trainer_settings import PseudoConfig

    # Two labels and the background prompt's channel last; pixel columns: cat, dog, background.
    probs = np.zeros((3, 2, 3), np.float32)
    probs[:, :, 0] = np.array([0.7, 0.2, 0.1])[:, None]
    probs[:, :, 1] = np.array([0.2, 0.5, 0.3])[:, None]
    probs[:, :, 2] = np.array([0.1, 0.2, 0.7])[:, None]
    rgb = np.zeros((2, 3, 3), np.uint8)
    config = PseudoConfig(crf=False, uncertain_threshold=None)
    mask = pseudo_mask(rgb, probs, config, background_channel=True)
    np.testing.assert_array_equal(mask, [[1, 2, 0], [1, 2, 0]])
    # With a threshold too, a label whose evidence is below it becomes background as well.
    evidence = np.array([[0.9, 0.4, 0.9], [0.9, 0.4, 0.9]], np.float32)
    mask = pseudo_mask(
        rgb, probs, config, background_threshold=0.6, background_channel=True, evidence=evidence
    )
    np.testing.assert_array_equal(mask, [[1, 0, 0], [1, 0, 0]])


def mask_all(probs: np.ndarray) -> np.ndarray:
    return (probs.argmax(axis=0) + 1).astype(np.uint8)
