"""Without ``--image-size`` a model runs at its own resolution: the UNet's sample size times
the VAE's factor (64 for demo/model, 512 for SD 1.x/2.x base, 768 for the 2.x v-models)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from labeler import SegmenterConfig, StableSeg
from labeler.commands import main
from labeler.jobs.models import load_stableseg
from labeler.jobs.pseudo_label import PseudoLabelOptions, run
from labeler.model_settings import ModelSpec
from labeler.segmenter import native_image_size
from labeler.settings import settings_of

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"


def _parts(sample_size, vae_levels: int) -> tuple[SimpleNamespace, SimpleNamespace]:
    unet = SimpleNamespace(config=SimpleNamespace(sample_size=sample_size))
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(128,) * vae_levels))
    return unet, vae


@pytest.mark.parametrize(
    ("sample_size", "vae_levels", "side"),
    [(64, 4, 512), (96, 4, 768), (16, 3, 64), ((48, 64), 4, 512), (None, 4, 512)],
)
def test_the_native_size_is_the_unet_sample_size_times_the_vae_factor(
    sample_size, vae_levels, side
):
    assert native_image_size(*_parts(sample_size, vae_levels)) == side


def test_the_default_is_the_models_own_and_an_explicit_size_wins(tiny_parts, tmp_path):
    model = StableSeg(**tiny_parts)  # unet sample 16, VAE factor 2
    assert model.config.image_size is None
    assert model.input_size == model.native_size == 32
    assert model.latent_size == (16, 16)
    assert model.with_config(SegmenterConfig(image_size=64)).input_size == 64
    assert model.prepare(np.zeros((10, 20, 3), np.uint8)).pixels.shape == (32, 32, 3)


def test_a_tiny_model_folder_gives_its_own_size(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["sample_size"] = 24  # the weights do not depend on it
    config_file.write_text(json.dumps(config))
    model = load_stableseg(ModelSpec(str(folder), device="cpu"))
    assert model.input_size == 48
    (mask,) = [r.mask for r in model.segment([np.zeros((20, 30, 3), np.uint8)], ["cat", "dog"])]
    assert mask.shape == (20, 30)


def test_the_demo_model_runs_at_64_without_image_size(tmp_path):
    default = load_stableseg(ModelSpec(str(DEMO), device="cpu"))
    assert default.input_size == 64
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "demo" / "scenes" / "images" / "scene_001.png", images / "scene_001.png")
    labels = (ROOT / "demo" / "scenes" / "colours.txt").read_text().split()
    masks = {}
    for name, model in (("own", default), ("64", default.with_config(SegmenterConfig(64)))):
        options = PseudoLabelOptions(
            images_dir=images, out_dir=tmp_path / name, labels=labels, workers=1
        )
        assert run(options, model=model).labelled == 1
        masks[name] = [
            (tmp_path / name / "masks" / f).read_bytes() for f in sorted(os.listdir(images))
        ]
    assert masks["own"] == masks["64"]


def test_every_command_defaults_to_the_models_own_size():
    """The one declaration: --help says so, and no command carries a size of its own."""
    (size,) = [item for item in settings_of(SegmenterConfig) if item.name == "image_size"]
    assert SegmenterConfig().image_size is None and size.default is None
    assert size.declaration.default_text == "the model's own"
    for command in ("pseudo-label", "refine", "benchmark", "serve"):
        result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "the model's own" in result.output, command
