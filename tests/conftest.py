"""Shared fixtures: a tiny random Stable Diffusion, built in-process (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from labeler import SegmenterConfig, StableSeg
from labeler.testing import tiny_components

TINY_SIZE = 64  # image side for the tiny model: latent 32, attention grids 32, 16 and 8


@pytest.fixture(scope="session")
def tiny_parts() -> dict:
    return tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_parts: dict) -> Path:
    """The tiny model written in diffusers layout, as a real checkpoint folder looks."""
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("tiny-sd")
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        tiny_parts[name].save_pretrained(root / name)
    DDPMScheduler().save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.27.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> StableSeg:
    torch.manual_seed(0)
    return StableSeg.from_pretrained(
        tiny_model_dir, device="cpu", config=SegmenterConfig(image_size=TINY_SIZE, batch_size=2)
    )
