"""Write the tiny random Stable Diffusion as a diffusers folder, laid out as a checkpoint."""

from __future__ import annotations

from pathlib import Path

from labeler.jobs.models import save_diffusers_folder
from labeler.testing import tiny_components


def save_tiny_model(root: Path, seed: int = 0, parts: dict | None = None) -> Path:
    """Save tiny components (from ``seed`` unless given) under ``root``, with model_index.json."""
    return save_diffusers_folder(parts or tiny_components(seed=seed), root)
