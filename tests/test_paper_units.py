"""The pieces behind the paper's tables: sweeps, Markdown tables, per-image label subsets, the
map-weight fit with per-image channels, per-image label files, the plan at the paper's sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labeler import SegmenterConfig
from labeler.jobs.sweep import parse_sweep, sweep_points
from labeler.jobs.tables import grid_markdown, sweep_grid, table1_markdown
from labeler.subsets import LabelSubset
from labeler.train.mapweights import PixelSampler, fit_map_weights, targets_at
from labeler.train.trainer_settings import MapFitConfig


def test_sweep_items_axes_and_points() -> None:
    axes = parse_sweep(["cross=16,32,64 self=<=16,<=32", "timestep=1,50"])
    assert [a.key for a in axes] == ["cross", "self", "timestep"]
    assert axes[1].values == ("<=16", "<=32")
    points = sweep_points(SegmenterConfig(), axes)
    assert len(points) == 3 * 2 * 2
    first, last = points[0], points[-1]
    assert first.values == {"cross": "16", "self": "<=16", "timestep": "1"}
    assert (first.config.cross_sizes, first.config.self_sizes) == ((16,), "<=16")
    assert (last.config.cross_sizes, last.config.timestep) == ((64,), 50)
    assert last.label() == "cross=64 self=<=32 timestep=50"
    (lists,) = parse_sweep(["cross=8+16,all"])
    assert [c["cross_sizes"] for c in lists.changes] == [(8, 16), "all"]
    sar = sweep_points(SegmenterConfig(), parse_sweep(["sar=on,off,self-only"]))
    assert [(p.config.use_sar, p.config.self_only) for p in sar] == [
        (True, False),
        (False, False),
        (True, True),
    ]
    (alone,) = sweep_points(SegmenterConfig(timestep=7), [])  # no sweep: the base config
    assert alone.config.timestep == 7 and alone.values == {} and alone.label() == ""


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["size=1"], "unknown key 'size'; choose from cross, self, timestep, sar"),
        (["cross"], "write key=v1,v2"),
        (["cross="], "no values"),
        (["cross=16,16"], "repeated"),
        (["cross=x"], "sweep cross='x': cannot read sizes"),
        (["timestep=-1"], "must be >= 0"),
        (["sar=maybe"], "choose from on, off, self-only"),
        (["cross=8", "cross=16"], "given twice"),
    ],
)
def test_sweep_errors_name_the_bad_part(items, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sweep(items)


def test_size_sweeps_with_learned_weights_are_refused() -> None:
    config = SegmenterConfig(map_weights={"a": 1.0})
    with pytest.raises(ValueError, match="learned map weights"):
        sweep_points(config, parse_sweep(["cross=8,16"]))
    assert len(sweep_points(config, parse_sweep(["timestep=1,2"]))) == 2


def test_tables_follow_the_papers_layout() -> None:
    row = table1_markdown("cityscapes", "Cityscapes (19 classes)", "StableSeg", 15.06)
    assert row.splitlines() == [
        "| Method | VOC-20 | Context-59 | ADE-150 | Cityscapes | FoodPix | FoodSeg103 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| StableSeg |  |  |  | 15.1 |  |  |",
    ]
    other = table1_markdown("camvid", "CamVid (11 classes)", "StableSeg", None)
    assert other.splitlines()[0].endswith("| FoodSeg103 | CamVid (11 classes) |")
    assert other.splitlines()[2].endswith("|  | - |")

    results = [
        {"values": {"cross": c, "self": s}, "mIoU": 10 * i + j}
        for i, c in enumerate(["16", "32"])
        for j, s in enumerate(["16", "32", "64"])
    ]
    grid = sweep_grid(
        ["cross", "self"], {"cross": ["16", "32"], "self": ["16", "32", "64"]}, results
    )
    assert grid["mIoU"] == [[0, 1, 2], [10, 11, 12]]
    assert grid_markdown(grid).splitlines() == [
        "| cross \\ self | 16 | 32 | 64 |",
        "| --- | --- | --- | --- |",
        "| 16 | 0.0 | 1.0 | 2.0 |",
        "| 32 | 10.0 | 11.0 | 12.0 |",
    ]
    row = sweep_grid(["sar"], {"sar": ["on", "off"]}, [
        {"values": {"sar": "on"}, "mIoU": 50.26}, {"values": {"sar": "off"}, "mIoU": None},
    ])  # fmt: skip
    assert grid_markdown(row).splitlines()[2] == "| mIoU | 50.3 | - |"
    three = sweep_grid(["a", "b", "c"], {}, [{"values": {"a": 1, "b": 2, "c": 3}, "mIoU": 4.0}])
    assert grid_markdown(three).splitlines()[2] == "| 1 | 2 | 3 | 4.0 |"
    assert grid_markdown(three).splitlines()[0] == "| a | b | c | mIoU |"


def test_label_subsets_map_ids_and_channels() -> None:
    subset = LabelSubset((3, 7))
    assert subset.names(["a", "b", "c", "d", "e", "f", "g"]) == ["c", "g"]
    mask = np.array([[0, 1, 2, 255]], np.uint8)
    np.testing.assert_array_equal(subset.to_global(mask), [[0, 3, 7, 255]])
    with pytest.raises(ValueError, match=r"\[3\]"):
        subset.to_global(np.array([[3]], np.uint8))
    table = subset.channel_table()
    assert (table[3], table[7], table[0], table[1], table[255]) == (0, 1, -1, -1, -1)
    assert subset.channel_table(background_channel=True)[0] == 2
    for bad in ((), (0,), (2, 1), (1, 1), (255,)):
        with pytest.raises(ValueError):
            LabelSubset(bad)
    assert LabelSubset.every(3).ids == (1, 2, 3)


def test_fit_targets_follow_each_images_channels() -> None:
    mask = np.array([[0, 1, 3], [3, 2, 255]], np.uint8)  # student ids, any label
    # Prompted with labels 1 and 3: channels 0 and 1; label 2 has no channel in this image.
    np.testing.assert_array_equal(targets_at(mask, (2, 3), None, (1, 3)), [[-1, 0, 1], [1, -1, -1]])
    np.testing.assert_array_equal(targets_at(mask, (2, 3), 2, (1, 3)), [[2, 0, 1], [1, -1, -1]])
    np.testing.assert_array_equal(targets_at(mask, (2, 3)), [[-1, 0, 2], [2, 1, -1]])

    sampler = PixelSampler(["x", "y"], (2, 2), MapFitConfig(pixels_per_image=4), 2, None)
    rng = np.random.default_rng(0)
    two = {n: rng.random((2, 2, 2)).astype(np.float16) for n in ("x", "y")}  # (C=2, h, w)
    three = {n: rng.random((3, 2, 2)).astype(np.float16) for n in ("x", "y")}  # (C=3, h, w)
    sampler.add(two, np.array([[1, 3], [3, 1]], np.uint8), (1, 3))
    sampler.add(three, np.array([[1, 2], [3, 0]], np.uint8), (1, 2, 3))
    features, labels = sampler.samples()
    assert features.shape == (7, 2, 3)  # padded to the largest channel count
    assert torch.all(features[:4, :, 2] == 0)  # the padding of the two-label image
    assert labels.tolist()[:4] == [0, 1, 1, 0]
    # Zero padding changes nothing: the loss is the same as with the two channels alone.
    fit = fit_map_weights(features[:4], labels[:4], ["x", "y"], {"x": 1.0, "y": 1.0})
    unpadded = fit_map_weights(features[:4, :, :2], labels[:4], ["x", "y"], {"x": 1.0, "y": 1.0})
    assert fit.weights == pytest.approx(unpadded.weights)
    assert fit.final_loss == pytest.approx(unpadded.final_loss)


def test_the_plan_at_512px_takes_the_paper_sizes(tiny_parts) -> None:
    """SD 1.5's UNet and VAE shapes (on the meta device: no weights): --cross-sizes 64
    --self-sizes 64 picks the 64x64 layers only, although they exclude the two smallest."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from labeler import StableSeg

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
    parts = {"text_encoder": tiny_parts["text_encoder"], "tokenizer": tiny_parts["tokenizer"]}
    model = StableSeg(unet, vae, config=SegmenterConfig(), **parts)
    default = model.plan()
    sides = {layer.name: layer.side for layer in model.attention_layers()}
    assert {sides[n] for n, w in default.cross.items() if w} == {8, 16}
    paper = model.with_config(SegmenterConfig(cross_sizes=(64,), self_sizes=(64,))).plan()
    chosen_cross = [n for n, w in paper.cross.items() if w]
    chosen_self = [n for n, w in paper.self_.items() if w]
    assert len(chosen_cross) == len(chosen_self) == 5  # down_blocks.0 (2), up_blocks.3 (3)
    assert {sides[n] for n in chosen_cross + chosen_self} == {64}
    assert paper.cross[chosen_cross[0]] == pytest.approx(0.2)
    assert paper.common_size == (64, 64)


def test_per_image_label_files(tmp_path: Path) -> None:
    from labeler.jobs.refine.files import labels_from_gt, labels_from_jsonl, pool_from_folder

    images, gt = tmp_path / "images", tmp_path / "gt"
    (images / "sub").mkdir(parents=True)
    gt.mkdir()
    for name in ("a", "b", "sub/c"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / f"{name}.png")
    (gt / "sub").mkdir()
    Image.fromarray(np.array([[0, 3], [255, 1]], np.uint8), mode="L").save(gt / "a.png")
    Image.fromarray(np.zeros((2, 2), np.uint8), mode="L").save(gt / "sub" / "c.png")
    pool = pool_from_folder(images)
    labels = ["cat", "dog", "bird"]

    from_gt = labels_from_gt(pool, gt, labels)
    assert from_gt.ids == {"a": (1, 3), "sub/c": ()}  # b has no mask: no entry
    Image.fromarray(np.array([[4]], np.uint8), mode="L").save(gt / "b.png")
    with pytest.raises(ValueError, match=r"b.png: ids \[4\] beyond the 3 labels"):
        labels_from_gt(pool, gt, labels)

    listing = tmp_path / "labels.jsonl"
    listing.write_text(
        json.dumps({"image": "a.png", "labels": ["Bird", "cat"]})
        + "\n\n"
        + json.dumps({"image": "sub/c", "labels": []})
        + "\n"
    )
    from_file = labels_from_jsonl(pool, images, listing, labels)
    assert from_file.ids == {"a": (1, 3), "sub/c": ()}
    assert from_file.digest() == from_gt.digest()  # the same mapping, whatever its source
    assert json.loads(from_file.to_json()) == {"a": [1, 3], "sub/c": []}
    for line, message in (
        ({"image": "z.png", "labels": []}, "line 1: image 'z.png' is not in the pool"),
        ({"image": "a.png", "labels": ["cow"]}, "line 1: label 'cow' is not one of the labels"),
        ({"image": "a.png"}, "line 1: expected"),
    ):
        listing.write_text(json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=message):
            labels_from_jsonl(pool, images, listing, labels)
    listing.write_text('{"image": "a.png", "labels": []}\n{"image": "a", "labels": []}\n')
    with pytest.raises(ValueError, match="line 2: image 'a' is listed twice"):
        labels_from_jsonl(pool, images, listing, labels)
    listing.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        labels_from_jsonl(pool, images, listing, labels)


def test_comparison_strip_rows() -> None:
    from exporters import comparison_strip, label_colours

    image = Image.new("RGB", (20, 10), (100, 100, 100))
    gt = np.zeros((10, 20), np.uint8)
    gt[:, 10:] = 1
    pred = np.full((10, 20), 2, np.uint8)
    strip = comparison_strip([(image, gt, pred)] * 2, ["cat", "dog"], height=40)
    # An 80 px image column and two overlay columns with their legends beside them, 4 px gaps;
    # a 16 px title line and two 40 px rows.
    assert strip.size[1] == 16 + 2 * (40 + 4) + 4
    assert strip.size[0] > 3 * 80 + 4 * 4
    left = np.asarray(strip)[16 + 30, 4 + 40]  # image column, untouched grey
    assert tuple(left) == (100, 100, 100)
    prediction_left = strip.size[0] - 4 - (strip.size[0] - 4 * 4 - 80) // 2
    blended = np.asarray(strip)[16 + 35, prediction_left + 70]  # prediction column: dog's
    expected = np.rint(0.5 * 100 + 0.5 * np.array(label_colours(["cat", "dog"])[1]))
    np.testing.assert_allclose(blended, expected, atol=1)
