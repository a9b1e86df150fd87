"""Write the tiny random Stable Diffusion as a diffusers folder, laid out as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from labeler.testing import tiny_components


def save_tiny_model(root: Path, seed: int = 0, parts: dict | None = None) -> Path:
    """Save tiny components (from ``seed`` unless given) under ``root``, with model_index.json."""
    from diffusers import DDPMScheduler

    parts = parts or tiny_components(seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        parts[name].save_pretrained(root / name)
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
