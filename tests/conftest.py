"""Shared fixtures: a tiny random Stable Diffusion, built in-process (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from labeler import SegmenterConfig, StableSeg
from labeler.testing import tiny_components

from .tiny import save_tiny_model

TINY_SIZE = 64  # image side for the tiny model: latent 32, attention grids 32, 16 and 8


@pytest.fixture(scope="session")
def tiny_parts() -> dict:
    return tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_parts: dict) -> Path:
    """The tiny model written in diffusers layout, as a real checkpoint folder looks."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd"), parts=tiny_parts)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> StableSeg:
    torch.manual_seed(0)
    return StableSeg.from_pretrained(
        tiny_model_dir, device="cpu", config=SegmenterConfig(image_size=TINY_SIZE, batch_size=2)
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU-marked tests where no CUDA device is present (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
