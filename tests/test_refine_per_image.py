"""``refine`` with per-image labels (the paper's Table 5 setting) end to end, and exact against
cache StableSeg++ masks, on a small pool whose images hold different label sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from exporters.png import png_to_mask
from labeler import SegmenterConfig, StableSeg, load_map_weights
from labeler.jobs.refine import run_refine
from labeler.jobs.refine.files import labels_from_gt, pool_from_folder
from labeler.result import SHARE_SUFFIX
from labeler.train.cache import maps_from_bytes

from .refine_helpers import cli_args, fast_options

pytestmark = pytest.mark.slow

LABELS = ("cat", "dog", "bird")
# image -> (disc label, ground label); None: no ground-truth mask; () an all-background mask.
SCENES = {
    "s0": (1, 2),
    "s1": (1, 3),
    "s2": (2, 3),
    "s3": (3, 1),
    "s4": (2, 1),
    "s5": (1, 2),
    "s6": (3, 2),
    "s7": (2, 2),
    "nogt": None,
    "empty": (),
}
# The largest attention side of the tiny model at 64 px: like the paper's (64, 64) at 512 px,
# it leaves out the two smallest cross-attention sides the default takes.
SIZES = ("--cross-sizes", "32", "--self-sizes", "32", "--batch-size", "1")


def _make_pool(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    images, truth = root / "pool", root / "gt"
    images.mkdir(parents=True)
    truth.mkdir()
    for key, scene in SCENES.items():
        height, width = (int(v) for v in rng.integers(40, 72, size=2))
        rows, cols = np.mgrid[:height, :width]
        disc = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (min(height, width) / 3) ** 2
        image = np.empty((height, width, 3), np.int64)
        image[:] = rng.integers(0, 256, size=3)
        image[disc] = rng.integers(0, 256, size=3)
        image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(images / f"{key}.png")
        if scene is None:
            continue
        mask = np.zeros((height, width), np.uint8)
        if scene:
            mask = np.where(disc, scene[0], scene[1]).astype(np.uint8)
        Image.fromarray(mask, mode="L").save(truth / f"{key}.png")
    return images, truth


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return png_to_mask(image)


def _own(key: str) -> list[int]:
    return sorted(set(SCENES[key]))


USABLE = [key for key, scene in SCENES.items() if scene]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """(root, exact work dir, cache work dir): the CLI run, and the same with the cache shortcut."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("per-image")
    images, truth = _make_pool(root)
    args = cli_args(images, root / "exact", tiny_model_dir)
    args[args.index("--labels") + 1] = ",".join(LABELS)
    args += ["--labels-from-gt", str(truth), "--val-gt", str(truth), *SIZES]
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0, shown.output
    segmenter = SegmenterConfig(image_size=64, batch_size=1, cross_sizes=(32,), self_sizes=(32,))
    options = fast_options(
        tiny_model_dir,
        labels=LABELS,
        segmenter=segmenter,
        image_labels=labels_from_gt(pool_from_folder(images), truth, LABELS),
        val_gt=truth,
        plusplus_masks="cache",
    )
    run_refine(images, root / "cache", options)
    torch.set_num_threads(before)
    return root, root / "exact", root / "cache", shown.output


def test_each_image_is_prompted_with_its_own_labels(runs) -> None:
    root, work, _, output = runs
    assert json.loads((work / "image_labels.json").read_text()) == {
        key: _own(key) for key, scene in SCENES.items() if scene is not None
    }
    report = json.loads((work / "report.json").read_text())
    skipped = report["stages"]["stableseg"]["skipped"]
    assert skipped == {
        str(root / "pool" / "empty.png"): f"--labels-from-gt {root / 'gt'} gives it none of the "
        "labels",
        str(root / "pool" / "nogt.png"): f"no labels for it in --labels-from-gt {root / 'gt'}",
    }
    assert report["stages"]["stableseg"]["images"] == len(USABLE)
    assert report["settings"]["image_labels"]["images"] == 9  # every image with a mask
    for key in USABLE:
        own = _own(key)
        maps, info = maps_from_bytes((work / "cache" / f"{key}.safetensors").read_bytes())
        assert info["labels"] == [LABELS[i - 1] for i in own]
        assert info["extra"]["label_ids"] == own
        assert all(m.shape[0] == len(own) for n, m in maps.items() if not n.endswith(SHARE_SUFFIX))
        # StableSeg masks in global ids, with only the image's labels (every pixel gets one).
        for folder, extra in (
            ("stableseg/masks", set()),
            ("plus/pseudo", {255}),
            ("plusplus/stableseg", set()),
            ("plusplus/pseudo", {255}),
        ):
            ids = set(np.unique(_mask(work / folder / f"{key}.png")).tolist())
            assert ids <= set(own) | extra, (folder, key, ids)
        # The students predict any label.
        assert set(np.unique(_mask(work / "plus" / "pred" / f"{key}.png"))) <= {1, 2, 3}
    assert (work / "plus" / "pred" / "s7.png").exists()
    assert not (work / "stableseg" / "masks" / "empty.png").exists()
    for stage in ("stableseg", "plus", "plusplus"):
        assert report["mIoU"][stage] is not None
    assert "plusplus masks exact; the cache shortcut differs on" in output


def test_the_chosen_sizes_reach_the_plan(runs, tiny_model) -> None:
    _, work, _, _ = runs
    plan = json.loads((work / "plan.json").read_text())
    sides = {layer.name: layer.side for layer in tiny_model.attention_layers()}
    assert {sides[n] for n, w in plan["cross"].items() if w} == {32}
    assert {sides[n] for n, w in plan["self"].items() if w} == {32}
    weights = load_map_weights(work / "plusplus" / "weights.safetensors")
    assert set(weights) == set(plan["cross"]) | set(plan["self"])  # every layer is fitted


def test_exact_masks_are_stableseg_with_the_learned_weights(runs, tiny_model_dir) -> None:
    root, work, _, _ = runs
    config = SegmenterConfig(
        image_size=64,
        batch_size=1,
        cross_sizes=(32,),
        self_sizes=(32,),
        map_weights=load_map_weights(work / "plusplus" / "weights.safetensors"),
    )
    model = StableSeg.from_pretrained(tiny_model_dir, device="cpu", config=config)
    for key in USABLE:
        own = _own(key)
        with Image.open(root / "pool" / f"{key}.png") as image:
            local = model.segment(image.convert("RGB"), [LABELS[i - 1] for i in own])[0].mask
        expected = np.array([0, *own], np.uint8)[local]  # prompted label k -> global id
        np.testing.assert_array_equal(
            _mask(work / "plusplus" / "stableseg" / f"{key}.png"), expected
        )


def test_the_report_counts_where_the_cache_shortcut_differs(runs) -> None:
    _, exact, cache, _ = runs
    report = json.loads((exact / "report.json").read_text())
    pseudo = report["stages"]["plusplus"]["pseudo"]
    assert pseudo["masks"] == "exact"
    counts = pseudo["cache_disagreement"]
    assert set(counts["per_image"]) == set(USABLE)
    assert counts["differing_pixels"] == sum(counts["per_image"].values()) > 0
    sizes = [_mask(exact / "stableseg" / "masks" / f"{k}.png").size for k in USABLE]
    assert counts["pixels"] == sum(sizes)
    assert counts["fraction"] == pytest.approx(counts["differing_pixels"] / counts["pixels"])

    # The same run with --plusplus-masks cache: same weights, masks from the cache, which differ
    # from the exact ones on exactly the counted pixels.
    other = json.loads((cache / "report.json").read_text())
    assert other["stages"]["plusplus"]["pseudo"]["masks"] == "cache"
    assert "cache_disagreement" not in other["stages"]["plusplus"]["pseudo"]
    assert other["settings"] == {**report["settings"], "plusplus_masks": "cache"}
    assert load_map_weights(cache / "plusplus" / "weights.safetensors") == load_map_weights(
        exact / "plusplus" / "weights.safetensors"
    )
    for key in USABLE:
        shortcut = _mask(cache / "plusplus" / "stableseg" / f"{key}.png")
        exact_mask = _mask(exact / "plusplus" / "stableseg" / f"{key}.png")
        assert int((shortcut != exact_mask).sum()) == counts["per_image"][key], key


def test_a_rerun_with_other_per_image_labels_is_refused(runs, tiny_model_dir) -> None:
    root, work, _, _ = runs
    args = cli_args(root / "pool", work, tiny_model_dir)
    args[args.index("--labels") + 1] = ",".join(LABELS)
    listing = root / "labels.jsonl"
    listing.write_text(json.dumps({"image": "s0.png", "labels": ["cat"]}) + "\n")
    shown = CliRunner().invoke(main, [*args, "--image-labels", str(listing), *SIZES])
    assert shown.exit_code == 2, shown.output
    assert "settings.image_labels.sha256" in shown.output, shown.output
    both = CliRunner().invoke(
        main, [*args, "--image-labels", str(listing), "--labels-from-gt", str(root / "gt")]
    )
    assert both.exit_code == 2 and "at most one of" in both.output
