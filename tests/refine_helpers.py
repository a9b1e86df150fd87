"""Shared by the refine tests: a synthetic pool with ground truth, fast options, file digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

LABELS = ("cat", "dog")
# Files whose content legitimately differs between runs (times); compared by their numbers.
VOLATILE = {"state.json", "report.json", "report.png", "run.json"}


def make_pool(root: Path, count: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """``count`` two-colour scenes (a disc on a plain ground) and their masks (1 disc, 2 ground).

    Returns (images folder, ground-truth folder).
    """
    rng = np.random.default_rng(seed)
    images, truth = root / "pool", root / "gt"
    images.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        height, width = (int(v) for v in rng.integers(40, 72, size=2))
        rows, cols = np.mgrid[:height, :width]
        radius = min(height, width) / 3
        disc = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < radius**2  # (H, W)
        image = np.empty((height, width, 3), dtype=np.int64)
        image[:] = rng.integers(0, 256, size=3)
        image[disc] = rng.integers(0, 256, size=3)
        image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(images / f"scene{index:02d}.png")
        mask = np.where(disc, 1, 2).astype(np.uint8)
        Image.fromarray(mask, mode="L").save(truth / f"scene{index:02d}.png")
    return images, truth


def fast_options(model_dir: Path, **changes):
    """RefineOptions for the tiny model: resnet18, no ImageNet, 64 px, one epoch, no bars."""
    from dataclasses import replace

    from labeler import SegmenterConfig
    from labeler.jobs.refine import RefineOptions
    from labeler.model_settings import ModelSpec
    from labeler.train.trainer_settings import MapFitConfig, StudentConfig

    options = RefineOptions(
        labels=LABELS,
        model=ModelSpec(str(model_dir), device="cpu"),
        segmenter=SegmenterConfig(image_size=64, batch_size=4),
        student=StudentConfig(
            encoder="resnet18", encoder_weights=None, crop_size=64, epochs=1, train_batch_size=4
        ),
        map_fit=MapFitConfig(steps=60),
        progress=False,
    )
    return replace(options, **changes)


def cli_args(images: Path, work: Path, model_dir: Path, epochs: int = 1) -> list[str]:
    """``refine`` arguments equivalent to :func:`fast_options`."""
    return [
        "refine",
        str(images),
        "--labels",
        ",".join(LABELS),
        "--work-dir",
        str(work),
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--image-size",
        "64",
        "--encoder",
        "resnet18",
        "--encoder-weights",
        "none",
        "--epochs",
        str(epochs),
        "--train-batch-size",
        "4",
        "--crop-size",
        "64",
        "--map-steps",
        "60",
    ]


def contents(work: Path) -> dict[str, str]:
    """Every file under the work dir but the volatile ones, by relative path, as a short digest
    of a comparable form: mask pixels for PNG, metadata and tensors for safetensors (whose
    header key order varies from write to write), parsed JSON, raw bytes otherwise.

    Digests, not the values: a failed ``==`` then names the differing files in a few lines
    (pytest under ``CI=true`` diffs whole values, which takes hours for model weights).
    """
    from safetensors.numpy import load

    found: dict[str, str] = {}
    for path in sorted(work.rglob("*")):
        if not path.is_file() or path.name in VOLATILE:
            continue
        data = path.read_bytes()
        digest = hashlib.sha256()
        if path.suffix == ".png":
            with Image.open(path) as image:
                pixels = np.array(image)
            digest.update(repr(pixels.shape).encode() + pixels.tobytes())
        elif path.suffix == ".safetensors":
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            digest.update(json.dumps(header.get("__metadata__"), sort_keys=True).encode())
            for name, tensor in sorted(load(data).items()):
                digest.update(name.encode() + repr(tensor.shape).encode() + tensor.tobytes())
        elif path.suffix == ".json":
            digest.update(json.dumps(json.loads(data), sort_keys=True).encode())
        else:
            digest.update(data)
        found[path.relative_to(work).as_posix()] = digest.hexdigest()[:16]
    return found


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine OpenMP spin-waiting makes two much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
