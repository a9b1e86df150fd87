"""The demo: scene generator, the shipped model's quality on the shipped scenes, resumable training.

The quality test is the project's guard against silent regressions: a wrong token index, a
broken attention recorder or SAR, or a mask-convention slip would pass the random-model tests
but drops the mIoU of the trained demo model below the figure measured in demo/README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from demo.scenes import (
    COLOUR_NAMES,
    COLOURS,
    EVAL_SEED,
    SHAPES,
    SceneConfig,
    SceneObject,
    caption_for,
    make_mosaic,
    make_scene,
    make_scenes,
    read_scene_set,
    shape_region,
    write_scene_set,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "demo" / "model"
DEMO_SCENES = ROOT / "demo" / "scenes"

# mIoU (percent, background + 4 colours) measured on demo/scenes with the settings of
# demo/model/stableseg.json (see demo/README.md); the test allows 5 points less.
MEASURED_MIOU = {"with SAR": 72.1, "without SAR": 73.5}
TOLERANCE = 5.0
# The mosaic tier (docs/demo.md): mosaics 0 and 1 (4 x 4 shipped scenes each, 256 px), every
# colour prompted, the demo model at its 64 px; measured on 2 CPU cores. Tiles must keep the
# issue's bar of 70 and their gain over the single squeezed pass.
MOSAIC_MIOU = {"tiles off": 21.1, "tiles 4": 73.1}
MOSAIC_BAR = 70.0


# ---------------------------------------------------------------------- scenes
def test_scenes_are_deterministic() -> None:
    first = make_scenes(seed=3, start=10, count=5)
    again = make_scenes(seed=3, start=10, count=5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.colour_mask, b.colour_mask)
        np.testing.assert_array_equal(a.shape_mask, b.shape_mask)
        assert a.caption == b.caption
    other = make_scene(seed=4, index=10)
    assert not np.array_equal(other.image, first[0].image)


def test_masks_are_exact() -> None:
    for scene in make_scenes(seed=7, start=0, count=40):
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 3
        assert len(set(scene.colours)) == len(scene.colours)  # distinct colours per scene
        rebuilt = scene.image.copy()
        for obj in scene.objects:
            colour_id = COLOUR_NAMES.index(obj.colour) + 1
            shape_id = SHAPES.index(obj.shape) + 1
            region = scene.colour_mask == colour_id  # (H, W)
            # The colour mask is exactly the object's drawn region, every pixel its colour ...
            np.testing.assert_array_equal(
                region, shape_region(obj.shape, 64, obj.centre, obj.radius)
            )
            assert (scene.image[region] == obj.rgb).all()
            assert (scene.shape_mask[region] == shape_id).all()
            rebuilt[region] = (0, 0, 0)
        # ... and nothing outside the masks is an object.
        background = scene.colour_mask == 0
        assert (scene.shape_mask[background] == 0).all()
        np.testing.assert_array_equal(rebuilt[background], scene.image[background])
        assert scene.caption == caption_for(scene.objects)
        for obj in scene.objects:
            assert f"a {obj.colour} {obj.shape}" in scene.caption


def test_caption_wording() -> None:
    def obj(colour: str, shape: str) -> SceneObject:
        return SceneObject(colour, shape, (10.0, 10.0), 5.0, COLOURS[colour])

    assert caption_for([obj("red", "circle")]) == "a red circle, background"
    pair = [obj("red", "circle"), obj("blue", "square")]
    assert caption_for(pair, background=False) == "a red circle and a blue square"
    three = [*pair, obj("green", "cross")]
    assert caption_for(three) == "a red circle, a blue square and a green cross, background"


def test_textured_backdrops_are_not_called_background() -> None:
    scenes = make_scenes(seed=5, start=0, count=60, config=SceneConfig(texture_prob=0.5))
    assert 0 < sum(scene.textured for scene in scenes) < 60
    for scene in scenes:
        assert scene.caption.endswith(", background") != scene.textured
    assert not any(scene.textured for scene in make_scenes(seed=5, start=0, count=60))


def test_scene_set_round_trip(tmp_path: Path) -> None:
    scenes = write_scene_set(tmp_path, count=3, seed=11, config=SceneConfig(size=48))
    names, images, gts, labels = read_scene_set(tmp_path)
    assert labels == list(COLOUR_NAMES)
    assert names == ["scene_000", "scene_001", "scene_002"]
    for scene, image, gt in zip(scenes, images, gts):
        np.testing.assert_array_equal(image, scene.image)
        np.testing.assert_array_equal(gt, scene.colour_mask)
    shape_mask = np.array(Image.open(tmp_path / "shape_masks" / "scene_000.png"))
    np.testing.assert_array_equal(shape_mask, scenes[0].shape_mask)


def test_shipped_scenes_match_the_generator() -> None:
    names, images, gts, labels = read_scene_set(DEMO_SCENES)
    assert labels == list(COLOUR_NAMES)
    assert len(names) == 100
    for index in (0, 37, 99):
        scene = make_scene(EVAL_SEED, index)
        np.testing.assert_array_equal(images[index], scene.image)
        np.testing.assert_array_equal(gts[index], scene.colour_mask)


# ---------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def demo_model():
    from demo.evaluate import load_demo_config
    from labeler import StableSeg

    torch.set_num_threads(2)
    config = load_demo_config(DEMO_MODEL)
    assert config.background_prompt == "background"
    return StableSeg.from_pretrained(DEMO_MODEL, device="cpu", dtype=torch.float32, config=config)


@pytest.fixture(scope="module")
def demo_table(demo_model) -> dict:
    from demo.evaluate import evaluate_table

    _, images, gts, labels = read_scene_set(DEMO_SCENES)
    return evaluate_table(demo_model, images, gts, labels)


@pytest.mark.parametrize("row", ["with SAR", "without SAR"])
def test_demo_model_quality(demo_table: dict, row: str) -> None:
    measured = demo_table[row]["mIoU"]
    floor = MEASURED_MIOU[row] - TOLERANCE
    assert measured >= floor, (
        f"demo model {row}: mIoU {measured:.1f} < {floor:.1f} (README figure "
        f"{MEASURED_MIOU[row]:.1f} - {TOLERANCE}); per class: {demo_table[row]['per_class']}"
    )


@pytest.mark.slow
def test_mosaic_tier_needs_tiles(demo_model) -> None:
    from demo.evaluate import mean_iou

    mosaics = [make_mosaic(EVAL_SEED, index, 4) for index in range(2)]
    labels = list(COLOUR_NAMES)
    measured = {}
    for row, tiles in (("tiles off", None), ("tiles 4", 4)):
        model = demo_model.with_config(demo_model.config.replace(tiles=tiles))
        masks = [result.mask for result in model.iter_segment([m.image for m in mosaics], labels)]
        assert masks[0].shape == (256, 256)
        measured[row] = mean_iou(masks, [m.colour_mask for m in mosaics], labels)["mIoU"]
    assert measured["tiles off"] <= MOSAIC_MIOU["tiles off"] + TOLERANCE, measured
    assert measured["tiles 4"] >= max(MOSAIC_BAR, MOSAIC_MIOU["tiles 4"] - TOLERANCE), measured


def test_mosaics_are_the_scenes_stitched() -> None:
    mosaic = make_mosaic(EVAL_SEED, 1, 2)
    assert mosaic.image.shape == (128, 128, 3)
    for position, index in enumerate(range(4, 8)):  # mosaic 1 of 2 x 2 holds scenes 4..7
        scene = make_scene(EVAL_SEED, index)
        rows = slice(64 * (position // 2), 64 * (position // 2 + 1))
        cols = slice(64 * (position % 2), 64 * (position % 2 + 1))
        np.testing.assert_array_equal(mosaic.image[rows, cols], scene.image)
        np.testing.assert_array_equal(mosaic.colour_mask[rows, cols], scene.colour_mask)
    assert len(mosaic.objects) == sum(len(make_scene(EVAL_SEED, i).objects) for i in range(4, 8))
    assert mosaic.caption.count("background") == 4


def test_demo_model_is_small_and_complete() -> None:
    total = sum(path.stat().st_size for path in DEMO_MODEL.rglob("*") if path.is_file())
    assert total <= 30 * 2**20
    for part in ("model_index.json", "stableseg.json", "unet", "vae", "text_encoder", "tokenizer"):
        assert (DEMO_MODEL / part).exists()


# ---------------------------------------------------------------------- training
def _train(out: Path, steps: int, extra: tuple[str, ...] = ()) -> None:
    from demo.train import cli

    args = [
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--vae-steps",
        "2",
        "--batch-size",
        "2",
        "--save-every",
        "2",
        "--probe-every",
        "0",
        "--quiet",
        *extra,
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output


def test_training_resumes_where_it_stopped(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    # Two calls (the first "killed" after 2 steps) give the same weights as one call of 4.
    _train(tmp_path / "resumed", 2)
    state = torch.load(tmp_path / "resumed.state.pt", weights_only=False)
    assert (state["vae_step"], state["unet_step"]) == (2, 2)
    _train(tmp_path / "resumed", 4)
    _train(tmp_path / "straight", 4)
    state = torch.load(tmp_path / "resumed.state.pt", weights_only=False)
    assert state["unet_step"] == 4
    weights = "unet/diffusion_pytorch_model.safetensors"
    resumed = load_file(tmp_path / "resumed" / weights)
    straight = load_file(tmp_path / "straight" / weights)
    assert resumed.keys() == straight.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], straight[name])
    # The exported folder is a checkpoint StableSeg loads.
    from labeler import SegmenterConfig, StableSeg

    model = StableSeg.from_pretrained(
        tmp_path / "resumed", device="cpu", config=SegmenterConfig(image_size=64)
    )
    (result,) = model.segment(make_scene(EVAL_SEED, 0).image, list(COLOUR_NAMES))
    assert result.mask.shape == (64, 64)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    from demo.train import cli

    _train(tmp_path / "m", 1)
    result = CliRunner().invoke(
        cli,
        ["--out", str(tmp_path / "m"), "--steps", "2", "--vae-steps", "2", "--batch-size", "3"],
    )
    assert result.exit_code != 0
    assert "batch_size" in result.output
