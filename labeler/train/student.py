"""Inference with a trained DeepLabV3+ student: the same results as ``StableSeg.segment``.

``load_student(folder)`` reads a folder written by the refine job (smp's ``save_pretrained``
plus ``stableseg_student.json``); ``student_segment(student, images, labels)`` returns one
:class:`labeler.SegmentationResult` per image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..images import to_rgb_array
from ..prompts import validate_labels
from ..result import SegmentationResult, mask_dtype
from ..scores import label_scores
from .data import resize_rgb, to_tensor
from .model import STUDENT_FORMAT, STUDENT_META_FILE, require_smp, unwrap

STRIDE = 32  # DeepLabV3+ needs input sides divisible by the encoder's output stride


@dataclass
class Student:
    """A trained student and what it was trained on.

    Attributes:
        model: the smp DeepLabV3+ (eval mode), ``len(labels) + 1`` outputs, background first.
        labels: label names; output k is ``labels[k - 1]``.
        background: whether output 0 (background) was trained; if not it is never predicted.
        image_size: the longer image side is resized to this before the forward pass.
    """

    model: torch.nn.Module
    labels: list[str]
    background: bool
    image_size: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_student(folder: str | PathLike[str], device: torch.device | str | None = None) -> Student:
    """Load a student folder (``W/plus/student`` or ``W/plusplus/student``).

    Raises:
        ValueError: the folder is not a student written by the refine job.
    """
    folder = Path(folder)
    meta_path = folder / STUDENT_META_FILE
    if not meta_path.is_file() or not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a refine student folder (expected config.json and "
            f"{STUDENT_META_FILE}, as written to W/plus/student or W/plusplus/student)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != STUDENT_FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}")
    model = _rebuild(folder)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(torch.device(device)).eval()
    return Student(
        model=model,
        labels=list(meta["labels"]),
        background=bool(meta["background"]),
        image_size=int(meta["image_size"]),
    )


def _rebuild(folder: Path) -> torch.nn.Module:
    """What ``smp.from_pretrained(folder)`` does for a local folder, without its stdout print."""
    from safetensors.torch import load_file

    smp = require_smp()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = config.pop("_model_class", "DeepLabV3Plus")
    config["encoder_weights"] = None  # the trained weights follow; never download
    model = getattr(smp, name)(**{k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, rgb: np.ndarray, image_size: int, device: torch.device
) -> torch.Tensor:
    """(K, H, W) float32 logits at the image's size for an (H, W, 3) uint8 image.

    The longer side is resized to ``image_size`` and the sides padded up to a multiple of 32;
    the logits of the unpadded part are upsampled (bilinear) to the original size.
    """
    height, width = rgb.shape[:2]
    scale = image_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pixels = to_tensor(resize_rgb(rgb, size))[None].to(device)  # (1, 3, h, w)
    pad_h = -size[1] % STRIDE
    pad_w = -size[0] % STRIDE
    pixels = F.pad(pixels, (0, pad_w, 0, pad_h))  # (1, 3, h', w'), zero = the mean colour
    logits = unwrap(model)(pixels)[:, :, : size[1], : size[0]]  # (1, K, h, w)
    logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear")
    return logits[0]  # (K, H, W)


def logits_to_mask(logits: torch.Tensor, background: bool) -> torch.Tensor:
    """(K, H, W) logits -> (H, W) ids; without ``background`` output 0 is never chosen."""
    if not background:
        logits = logits.clone()
        logits[0] = float("-inf")
    return logits.argmax(dim=0)


def _select(student: Student, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return list(student.labels)
    labels = validate_labels(labels, max_labels=None)
    unknown = [name for name in labels if name not in student.labels]
    if unknown:
        raise ValueError(
            f"labels {unknown} are not among the student's labels {student.labels}; a student "
            "only predicts the labels it was trained on"
        )
    return labels


def student_segment(
    student: Student,
    images: Any,
    labels: Sequence[str] | None = None,
    image_size: int | None = None,
) -> list[SegmentationResult]:
    """Segment images with a trained student.

    Args:
        student: from :func:`load_student`.
        images: a PIL image or numpy array, or a list of them.
        labels: the labels to predict, a subset of ``student.labels`` in any order (mask id k
            is ``labels[k - 1]``, as with StableSeg); None for all of the student's labels.
        image_size: longer side at inference; None for the training size.

    Returns:
        One :class:`SegmentationResult` per image at its original size: ``mask`` (0 =
        background, only for a student trained with background), ``probs`` (C, H, W) softmax
        over the chosen labels, ``scores`` the mean probability over each label's pixels.
    """
    labels = _select(student, labels)
    size = image_size or student.image_size
    if not isinstance(images, (list, tuple)):
        images = [images]
    channels = [0] + [student.labels.index(name) + 1 for name in labels]
    results = []
    for index, image in enumerate(images):
        rgb = to_rgb_array(image, index=index)
        logits = predict_logits(student.model, rgb, size, student.device)[channels]  # (1+C, H, W)
        mask = logits_to_mask(logits, student.background)  # (H, W)
        probs = logits[1:].softmax(dim=0)  # (C, H, W)
        scores = label_scores(mask, probs, labels)
        results.append(
            SegmentationResult(
                mask=mask.cpu().numpy().astype(mask_dtype(len(labels))),
                probs=probs.cpu().numpy().astype(np.float32),
                labels=list(labels),
                scores=scores,
            )
        )
    return results
