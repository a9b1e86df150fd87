"""The DeepLabV3+ student (segmentation_models_pytorch) and the metadata saved beside it.

Class ids of the student's outputs are the mask ids: output 0 is background, output k is
``labels[k - 1]``. A run without a background threshold never trains output 0, and prediction
leaves it out, so such a student gives every pixel one of the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .data import IMAGENET_MEAN, IMAGENET_STD

STUDENT_FORMAT = "stableseg-student/1"
STUDENT_META_FILE = "stableseg_student.json"


class EncoderWeightsUnavailable(RuntimeError):
    """The pretrained encoder weights could not be downloaded (or found in the cache)."""


def require_smp() -> Any:
    try:
        import segmentation_models_pytorch as smp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the refine trainer needs segmentation-models-pytorch: "
            "pip install segmentation-models-pytorch"
        ) from error
    return smp


def build_student(
    encoder: str, encoder_weights: str | None, num_labels: int, seed: int | None = None
) -> torch.nn.Module:
    """A DeepLabV3+ with ``num_labels + 1`` output channels (background first).

    Raises:
        ValueError: unknown encoder name (the message lists the valid ones).
        EncoderWeightsUnavailable: ``encoder_weights="imagenet"`` and no network or cache.
    """
    smp = require_smp()
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    names = smp.encoders.get_encoder_names()
    if encoder not in names and not encoder.startswith("tu-"):
        raise ValueError(
            f"unknown encoder {encoder!r}; valid smp encoders include: "
            f"{', '.join(sorted(names)[:40])} ... (or any timm model as 'tu-<name>')"
        )
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = smp.DeepLabV3Plus(
            encoder_name=encoder, encoder_weights=encoder_weights, classes=num_labels + 1
        )
    except KeyError as error:  # smp: weights name not offered for this encoder
        raise ValueError(str(error).strip("'\"")) from None
    except OSError as error:  # huggingface_hub: no network and not in the cache
        raise EncoderWeightsUnavailable(
            f"cannot download ImageNet weights for encoder {encoder!r} ({error.__class__.__name__}"
            "); use --encoder-weights none or pre-populate the Hugging Face hub cache (HF_HOME) "
            f"with smp-hub/{encoder}.imagenet, where segmentation-models-pytorch 0.5+ reads "
            "encoder weights (older versions: the torch hub cache)"
        ) from None
    # The saved config must rebuild the model without downloading anything: the trained
    # weights replace the ImageNet ones anyway.
    model.config["encoder_weights"] = None
    return model


def student_metadata(
    labels: Sequence[str], background: bool, image_size: int, encoder: str
) -> dict[str, Any]:
    """What ``load_student`` needs beside smp's own config (written as ``STUDENT_META_FILE``)."""
    return {
        "format": STUDENT_FORMAT,
        "labels": list(labels),
        "background": bool(background),
        "image_size": int(image_size),
        "encoder": encoder,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "class_ids": {"0": "background", **{str(k): n for k, n in enumerate(labels, 1)}},
    }


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
