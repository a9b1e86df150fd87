"""StableSeg end to end on the tiny random Stable Diffusion."""

import numpy as np
import pytest
import torch
from PIL import Image

from labeler import SegmentationResult, SegmenterConfig, StableSeg
from labeler.result import share_key
from labeler.testing import tiny_components
from labeler.weights import load_map_weights, map_weights_to_bytes

from .attention_helpers import record_attention
from .conftest import TINY_SIZE

LABELS = ["cat", "dog", "traffic light"]


def _image(height=40, width=56, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def test_from_pretrained_loads_the_diffusers_folder(tiny_model, tiny_model_dir, tiny_parts):
    assert tiny_model.source == str(tiny_model_dir)
    assert tiny_model.device.type == "cpu" and tiny_model.dtype == torch.float32
    loaded = dict(tiny_model.unet.state_dict())
    for name, value in tiny_parts["unet"].state_dict().items():
        torch.testing.assert_close(loaded[name], value)
    assert (
        tiny_model.tokenizer("traffic light")["input_ids"]
        == tiny_parts["tokenizer"]("traffic light")["input_ids"]
    )


def test_segment_returns_masks_at_the_original_size(tiny_model):
    images = [_image(40, 56), _image(33, 17, seed=1)]
    results = tiny_model.segment(images, LABELS, return_probs=True)
    assert [r.mask.shape for r in results] == [(40, 56), (33, 17)]
    for result in results:
        assert isinstance(result, SegmentationResult)
        assert result.mask.dtype == np.uint8
        assert result.probs.shape == (3, *result.mask.shape) and result.probs.dtype == np.float32
        np.testing.assert_allclose(result.probs.sum(axis=0), 1.0, atol=1e-5)
        # Every pixel gets a label (no threshold): the mask is the argmax of probs, 1-based.
        np.testing.assert_array_equal(result.mask, result.probs.argmax(axis=0) + 1)
        assert result.labels == LABELS
        assert set(result.scores) == set(LABELS)
        for k, label in enumerate(LABELS, start=1):
            won = result.mask == k
            expected = result.probs[k - 1][won].mean() if won.any() else 0.0
            assert result.scores[label] == pytest.approx(expected, rel=1e-5)


def test_segment_is_deterministic_and_batch_independent(tiny_model):
    images = [_image(seed=s) for s in range(3)]
    together = tiny_model.segment(images, LABELS, return_probs=True)
    again = tiny_model.segment(images, LABELS, return_probs=True)
    alone = [tiny_model.segment(image, LABELS, return_probs=True)[0] for image in images]
    for a, b, c in zip(together, again, alone):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.probs, b.probs)
        np.testing.assert_allclose(a.probs, c.probs, atol=1e-5)


def test_recording_leaves_the_unet_output_unchanged_and_processors_restored(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    latents = torch.randn(1, 4, 32, 32)
    context = torch.randn(1, 77, 32)
    plain = unet(latents, 1, encoder_hidden_states=context).sample
    plan = tiny_model.plan(all_layers=True)
    with record_attention(unet, plan.layers) as store:
        store.token_index = torch.tensor([[1, 2]])
        recorded = unet(latents, 1, encoder_hidden_states=context).sample
        assert len(store.cross) == sum(layer.kind == "cross" for layer in plan.layers)
        assert len(store.queries) == sum(layer.kind == "self" for layer in plan.layers)
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)
    assert dict(unet.attn_processors) == before


def test_processors_restored_after_an_exception(tiny_model):
    before = dict(tiny_model.unet.attn_processors)
    with pytest.raises(RuntimeError, match="token_index"):
        # No token index set: the first recorded cross-attention layer raises mid-pass.
        with record_attention(tiny_model.unet, tiny_model.plan().layers):
            tiny_model.unet(torch.randn(1, 4, 32, 32), 1, torch.randn(1, 77, 32))
    assert dict(tiny_model.unet.attn_processors) == before
    # A wrong input size raises from inside the pass; the processors come back too.
    other = tiny_model.with_config(SegmenterConfig(image_size=TINY_SIZE))
    plan = other.plan()
    with pytest.raises(RuntimeError, match="expected"):
        with record_attention(other.unet, plan.layers) as store:
            store.token_index = torch.tensor([[1]])
            other.unet(torch.randn(1, 4, 16, 16), 1, torch.randn(1, 77, 32))
    assert dict(tiny_model.unet.attn_processors) == before


def test_more_labels_than_one_prompt_holds():
    parts = tiny_components(seed=0, model_max_length=16)
    model = StableSeg(**parts, config=SegmenterConfig(image_size=TINY_SIZE))
    labels = [
        "cat",
        "dog",
        "person",
        "car",
        "tree",
        "sky",
        "road",
        "grass",
        "bird",
        "horse",
        "zebra crossing",
    ]
    prompts, embeddings = model.encode_prompts(labels)
    assert prompts.num_prompts >= 2 and embeddings.shape[0] == prompts.num_prompts
    result = model.segment(_image(), labels, return_probs=True)[0]
    assert result.probs.shape[0] == len(labels)
    np.testing.assert_allclose(result.probs.sum(axis=0), 1.0, atol=1e-5)
    assert result.mask.max() <= len(labels) and result.mask.min() >= 1


def test_many_labels_use_a_wider_mask_dtype():
    parts = tiny_components(seed=0)
    model = StableSeg(**parts, config=SegmenterConfig(image_size=32))
    labels = [f"x{i}" for i in range(300)]
    result = model.segment(_image(8, 8), labels, return_probs=True)[0]
    assert result.mask.dtype == np.uint16 and result.probs.shape == (300, 8, 8)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (31, 23), 128),
        Image.new("LA", (31, 23), (128, 200)),
        Image.new("RGBA", (31, 23), (10, 20, 30, 0)),
        Image.new("P", (31, 23), 3),
        Image.new("CMYK", (31, 23), (0, 128, 255, 10)),
        Image.new("I;16", (31, 23), 40000),
        Image.new("1", (31, 23), 1),
        np.full((23, 31), 60000, dtype=np.uint16),
        np.random.default_rng(0).random((23, 31, 4)).astype(np.float32),
        np.zeros((23, 31, 1), dtype=np.uint8),
    ],
    ids=["L", "LA", "RGBA", "P", "CMYK", "I16", "1", "u16-array", "float-rgba", "hw1"],
)
def test_any_image_mode_and_odd_size(tiny_model, image):
    result = tiny_model.segment(image, ["cat", "dog"])[0]
    assert result.mask.shape == (23, 31)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((0, 5, 3), np.uint8), ["cat"], "zero size"),
        (Image.new("RGB", (0, 4)), ["cat"], "zero size"),
        (np.zeros((4, 4, 5), np.uint8), ["cat"], "shape"),
        (np.zeros((4, 4, 3), np.uint8), [], "empty"),
        (np.zeros((4, 4, 3), np.uint8), ["cat", "cat"], "duplicate label 'cat'"),
        (np.zeros((4, 4, 3), np.uint8), ["cat", " "], "blank"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(tiny_model, images, labels, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.segment(images, labels)


def test_background_threshold_leaves_pixels_of_weak_evidence_unlabeled(tiny_model):
    """A pixel is background where its label's cross-attention is below the threshold times
    that label's strongest in the image (labeler.background)."""
    strict = tiny_model.with_config(tiny_model.config.replace(background_threshold=0.99))
    result = strict.segment(_image(), LABELS, return_probs=True)[0]
    np.testing.assert_array_equal(result.mask == 0, result.evidence < 0.99)
    assert (result.mask == 0).mean() > 0.5  # most pixels are far from their label's peak
    assert result.evidence.max() <= 1.0 + 1e-6
    loose = tiny_model.with_config(tiny_model.config.replace(background_threshold=0.01))
    assert (loose.segment(_image(), LABELS)[0].mask > 0).all()
    plain = tiny_model.segment(_image(), LABELS)[0].mask
    np.testing.assert_array_equal(result.mask[result.mask > 0], plain[result.mask > 0])


def test_configuration_choices_change_the_plan(tiny_model):
    default = tiny_model.plan()
    cross_sides = sorted({layer.side for layer in default.layers if layer.kind == "cross"})
    assert cross_sides == [8, 16]  # the two smallest cross-attention sizes
    assert default.common_size == (32, 32)
    no_sar = tiny_model.with_config(tiny_model.config.replace(use_sar=False)).plan()
    assert all(layer.kind == "cross" for layer in no_sar.layers)
    only_32 = tiny_model.with_config(tiny_model.config.replace(cross_sizes=(32,))).plan()
    assert {layer.side for layer in only_32.layers if layer.kind == "cross"} == {32}
    with pytest.raises(ValueError, match=r"valid sizes: \[8, 16, 32\]"):
        tiny_model.with_config(tiny_model.config.replace(cross_sizes=(64,))).plan()


def test_without_sar_and_self_only_give_different_maps(tiny_model):
    image = _image()
    full = tiny_model.segment(image, LABELS, return_probs=True)[0].probs
    plain = tiny_model.with_config(tiny_model.config.replace(use_sar=False))
    self_only = tiny_model.with_config(tiny_model.config.replace(self_only=True))
    assert not np.allclose(full, plain.segment(image, LABELS, return_probs=True)[0].probs)
    assert not np.allclose(full, self_only.segment(image, LABELS, return_probs=True)[0].probs)


def test_layer_maps_and_learned_weights(tiny_model, tmp_path):
    image = _image()
    result = tiny_model.segment(image, LABELS, return_probs=True, return_layer_maps=True)[0]
    layers = tiny_model.attention_layers()
    shares = {share_key(layer.name) for layer in layers if layer.kind == "cross"}
    assert set(result.layer_maps) == {layer.name for layer in layers} | shares
    for layer in layers:
        assert result.layer_maps[layer.name].shape == (3, *layer.size)
        assert result.layer_maps[layer.name].dtype == np.float16

    # Weights equal to the uniform plan reproduce the default result exactly.
    plan = tiny_model.plan()
    uniform = {**plan.cross, **plan.self_}
    path = tmp_path / "weights.safetensors"
    path.write_bytes(map_weights_to_bytes(uniform, {"note": "uniform"}))
    weights = load_map_weights(path)
    assert weights == pytest.approx(uniform)
    weighted = tiny_model.with_config(tiny_model.config.replace(map_weights=weights))
    weighted_probs = weighted.segment(image, LABELS, return_probs=True)[0].probs
    np.testing.assert_allclose(weighted_probs, result.probs, atol=1e-6)
    assert weighted.model_version != tiny_model.model_version

    # A single cross-attention layer alone: the map is that layer's CAPM, nothing else.
    name = next(layer.name for layer in layers if layer.kind == "cross" and layer.side == 8)
    one = tiny_model.with_config(tiny_model.config.replace(map_weights={name: 1.0}, use_sar=False))
    assert one.plan().layers == [layer for layer in layers if layer.name == name]

    with pytest.raises(ValueError, match="does not have"):
        tiny_model.with_config(tiny_model.config.replace(map_weights={"nope": 1.0})).plan()


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 8"):
        SegmenterConfig(image_size=100)
    with pytest.raises(ValueError, match="prompt_template"):
        SegmenterConfig(prompt_template="no slot")
    with pytest.raises(ValueError, match="background_threshold"):
        SegmenterConfig(background_threshold=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        SegmenterConfig(map_weights={"a": -1.0})


def test_background_prompt_is_one_more_class_whose_pixels_are_background(tiny_model):
    config = tiny_model.config.replace(background_prompt="background")
    model = tiny_model.with_config(config)
    assert model.prompt_labels(LABELS) == [*LABELS, "background"]
    result = model.segment(_image(), LABELS, return_probs=True, return_layer_maps=True)[0]
    assert result.probs.shape[0] == len(LABELS)  # the labels' share only
    assert next(iter(result.layer_maps.values())).shape[0] == len(LABELS) + 1
    background = 1.0 - result.probs.sum(axis=0)  # (H, W) what the background prompt holds
    wins = background > result.probs.max(axis=0)
    assert wins.any() and not wins.all()  # the random model splits the image
    np.testing.assert_array_equal(result.mask == 0, wins)
    np.testing.assert_array_equal(result.mask[~wins], result.probs.argmax(axis=0)[~wins] + 1)
    assert model.model_version != tiny_model.model_version
    with pytest.raises(ValueError, match="duplicate label 'background'"):
        model.segment(_image(), ["cat", "background"])


def test_prepared_images_give_the_masks_of_the_full_images(tiny_model):
    """A caller that resizes for the model itself (the pipeline's reading threads) gets the
    same masks, at the original size, as one that hands over the full image."""
    from labeler.images import PreparedImage, resize_for_model, to_rgb_array

    images = [_image(40, 56), _image(33, 17, seed=1)]
    side = tiny_model.config.image_size
    prepared = [
        PreparedImage(resize_for_model(to_rgb_array(image), side), (image.shape[1], image.shape[0]))
        for image in images
    ]
    expected = tiny_model.segment(images, LABELS)
    got = tiny_model.segment(prepared, LABELS)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.scores == b.scores
    wrong = PreparedImage(np.zeros((side + 8, side, 3), np.uint8), (10, 10))
    with pytest.raises(ValueError, match="prepared image 0 must be"):
        tiny_model.segment(wrong, LABELS)
