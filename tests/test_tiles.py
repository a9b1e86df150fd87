"""Tiles (labeler.tiles, ``--tiles``): the windows' geometry and blend on hand-made tensors, the
segmenter and the CLI with tiles on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from labeler import SegmenterConfig
from labeler.jobs.sweep import parse_sweep, sweep_points
from labeler.tiles import (
    EDGE_WEIGHT,
    TileCanvas,
    Window,
    tile_windows,
    window_labels,
    window_origins,
    window_weight,
    working_size,
)

from .test_benchmark import _folder_args, folder_root  # noqa: F401 (a fixture)


# ---------------------------------------------------------------------- geometry and blend
def test_window_origins_cover_the_axis_with_the_overlap_asked() -> None:
    assert window_origins(256, 64, 0.25, 4) == [0, 48, 96, 144, 192]
    assert window_origins(256, 64, 0.0, 4) == [0, 64, 128, 192]
    assert window_origins(64, 64, 0.5, 4) == [0]
    for length, overlap in ((200, 0.25), (520, 0.5), (72, 0.1)):
        origins = window_origins(length, 64, overlap, 8)
        assert origins[0] == 0 and origins[-1] == length - 64  # the ends are covered
        assert all(o % 8 == 0 for o in origins)  # on score cells
        gaps = np.diff(origins)
        assert (64 - gaps >= overlap * 64 - 8).all()  # neighbours share the overlap (a cell)
    with pytest.raises(ValueError, match="overlap"):
        window_origins(128, 64, 1.0, 8)


def test_working_size_scales_the_longer_side_to_tiles_model_sides() -> None:
    assert working_size((1000, 500), 64, 4, 4) == (256, 128)
    assert working_size((480, 640), 512, 2, 8) == (768, 1024)
    assert working_size((1000, 40), 64, 2, 4) == (128, 64)  # never under the model's side
    with pytest.raises(ValueError, match=">= 1"):
        working_size((10, 10), 64, 0.5, 4)
    windows = tile_windows((128, 64), 64, 0.5, 4)
    assert [(w.top, w.left) for w in windows] == [(0, 0), (0, 32), (0, 64)]


def test_window_weight_is_a_tent_with_positive_edges() -> None:
    weight = window_weight(5)
    assert weight[2, 2] == 1.0
    assert weight[0, 2] == pytest.approx(EDGE_WEIGHT)
    assert weight[0, 0] == pytest.approx(EDGE_WEIGHT**2)
    torch.testing.assert_close(weight, weight.T)
    torch.testing.assert_close(weight, weight.flip(0))
    assert window_weight(1).item() == 1.0


def test_canvas_blends_overlapping_windows_by_their_weights() -> None:
    canvas = TileCanvas(2, (4, 6), "cpu")
    first = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])[None]  # (1, 2, 4, 4)
    second = torch.stack([3 * torch.ones(4, 4), torch.ones(4, 4)])[None]
    canvas.add(first, [(0, 0)])
    canvas.add(second, [(0, 2)])
    blended = canvas.result()  # (2, 4, 6)
    assert blended.shape == (2, 4, 6)
    torch.testing.assert_close(blended[0, :, :2], torch.ones(4, 2))  # the first window alone
    torch.testing.assert_close(blended[0, :, 4:], 3 * torch.ones(4, 2))  # the second alone
    tent = window_weight(4)[1]  # a row of the window's weight, (4,)
    # Column 2 is the first window's third cell and the second window's first.
    a, b = tent[2], tent[0]
    expected = (a * 1 + b * 3) / (a + b)
    torch.testing.assert_close(blended[0, 1, 2], expected)
    assert 1 < blended[0, 1, 2] < 2  # nearer the first window's centre: nearer its value
    torch.testing.assert_close(blended[1, 1, 2], b / (a + b))
    # Equal maps blend to themselves; a cell no window covers is 0.
    same = TileCanvas(1, (4, 7), "cpu")
    same.add(torch.full((2, 1, 4, 4), 0.5), [(0, 0), (0, 2)])
    torch.testing.assert_close(same.result()[:, :, :6], torch.full((1, 4, 6), 0.5))
    assert same.result()[0, 0, 6] == 0


def test_window_labels_keep_what_the_whole_image_sees_near_the_window() -> None:
    probs = torch.full((3, 4, 8), 0.02)  # (C, h, w) a whole-image pass over a 2:1 image
    probs[0, :, :3] = 0.9  # label 0 left
    probs[1, :, 5:] = 0.9  # label 1 right
    probs[2, :, :] = 0.08  # label 2 weak everywhere, so its peak is everywhere
    left = Window(top=0, left=0, side=64)  # the left half of a (128, 64) working image
    allowed = window_labels(probs, left, (128, 64), gate=0.3, margin=0)
    assert allowed.tolist() == [True, False, True]
    right = Window(top=0, left=64, side=64)
    assert window_labels(probs, right, (128, 64), gate=0.3, margin=0).tolist() == [
        False,
        True,
        True,
    ]
    # The margin reaches one cell over: label 1 starts at column 5, the left half ends at 4.
    assert window_labels(probs, left, (128, 64), gate=0.3, margin=2)[1]
    assert window_labels(probs, left, (128, 64), gate=0.0, margin=0).all()
    # The region's strongest label always takes part, whatever the gate.
    assert window_labels(probs, left, (128, 64), gate=1.0, margin=0).tolist() == [
        True,
        False,
        True,
    ]


# ---------------------------------------------------------------------- the segmenter
def test_tiles_setting_reads_and_validates() -> None:
    assert SegmenterConfig(tiles="2").tiles == 2.0
    assert SegmenterConfig(tiles="off").tiles is None
    for bad in ("0.5", "many", float("inf")):
        with pytest.raises(ValueError, match="tiles"):
            SegmenterConfig(tiles=bad)
    with pytest.raises(ValueError, match="tile_overlap"):
        SegmenterConfig(tile_overlap=0.95)
    # Off, the masks' settings are those of runs made before tiles existed.
    assert "tiles" not in SegmenterConfig().mask_settings()
    assert SegmenterConfig(tiles=2).mask_settings()["tiles"] == 2.0
    (axis,) = parse_sweep(["tiles=off,3"])
    points = sweep_points(SegmenterConfig(), [axis])
    assert [p.config.tiles for p in points] == [None, 3.0]


def test_one_tile_without_a_gate_is_the_papers_pass(tiny_model) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    labels = ["cat", "dog", "person"]
    plain = tiny_model.segment(image, labels, return_probs=True)[0]
    tiled_model = tiny_model.with_config(tiny_model.config.replace(tiles=1, tile_gate=0.0))
    tiled = tiled_model.segment(image, labels, return_probs=True)[0]
    assert (tiled.mask == plain.mask).mean() > 0.999
    np.testing.assert_allclose(tiled.probs, plain.probs, atol=1e-4)


def test_tiles_segment_a_large_image_at_its_size(tiny_model) -> None:
    config = tiny_model.config.replace(tiles=1.5, tile_overlap=0.5)
    model = tiny_model.with_config(config)
    assert model.input_size == 96  # readers decode at least this large
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)  # (H, W, 3)
    prepared = model.prepare(image)
    assert prepared.size == (150, 100) and prepared.pixels.shape == (64, 96, 3)  # 2 windows
    labels = ["cat", "dog"]
    (direct,) = model.segment(image, labels, return_probs=True)
    (from_prepared,) = model.segment([prepared], labels)
    assert direct.mask.shape == (100, 150) and direct.probs.shape == (2, 100, 150)
    np.testing.assert_array_equal(direct.mask, from_prepared.mask)
    np.testing.assert_allclose(direct.probs.sum(axis=0), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="tiles"):
        model.segment(image, labels, return_layer_maps=True)
    with pytest.raises(ValueError, match="multiple of 2"):
        model.segment([type(prepared)(prepared.pixels[:, :95], prepared.size)], labels)


def test_tiles_batch_the_windows_of_several_images(tiny_model) -> None:
    # Images of different sizes in one batch: the whole-image passes share a call, windows of
    # two images share calls, and each image's masks are those of segmenting it alone.
    rng = np.random.default_rng(2)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in ((100, 150, 3), (64, 64, 3), (150, 90, 3))
    ]
    labels = ["cat", "dog", "person"]
    config = tiny_model.config.replace(tiles=1.5, tile_overlap=0.5, presence_threshold=0.99)
    for extra in ({}, {"reprompt": True}):
        alone = tiny_model.with_config(config.replace(batch_size=1, **extra))
        batched = tiny_model.with_config(config.replace(batch_size=3, **extra))
        together = batched.segment(images, labels, return_probs=True)
        for image, result in zip(images, together):
            (single,) = alone.segment(image, labels, return_probs=True)
            assert result.mask.shape == image.shape[:2]
            np.testing.assert_allclose(result.probs, single.probs, atol=1e-4)
            assert (result.mask == single.mask).mean() > 0.999


def test_tiles_through_benchmark_with_saved_masks(
    folder_root,  # noqa: F811 (the fixture imported above)
    tiny_model_dir,
    tmp_path,
) -> None:
    out, masks = tmp_path / "out", tmp_path / "masks"
    args = _folder_args(folder_root, tiny_model_dir, out, "--sweep", "tiles=1.5", "--limit", "2")
    shown = CliRunner().invoke(main, [*args, "--save-masks", str(masks)])
    assert shown.exit_code == 0, shown.output
    report = json.loads((out / "benchmark.json").read_text())
    points = report["sweep"]["points"]
    assert [p["segmenter"].get("tiles") for p in points] == [1.5]  # a setting swept by its name
    assert points[0]["method"] == "StableSeg, tiles 1.5"
    for folder in ("tiles=1.5",):
        written = sorted(
            p.relative_to(masks / folder).as_posix()
            for p in masks.rglob("*.png")
            if folder in p.parts
        )
        assert written == ["img0.png", "img1.png"]
        with Image.open(masks / folder / "img1.png") as saved:
            ids = np.array(saved)
            assert saved.size == (52, 36) and set(np.unique(ids)) <= {0, 1, 2}
