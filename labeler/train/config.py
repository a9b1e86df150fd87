"""Every default of the StableSeg+ / StableSeg++ trainer in one place."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import SegmenterConfig
from ..crf import CRFConfig
from ..prompts import validate_labels

ENCODER_WEIGHTS = ("imagenet", None)


@dataclass(frozen=True)
class StudentConfig:
    """How the DeepLabV3+ student is built and trained.

    Attributes:
        encoder: a segmentation_models_pytorch encoder name (``resnet50``, ``resnet18``, ...).
        encoder_weights: ``"imagenet"`` (downloaded by smp from the Hugging Face hub) or None.
        image_size: side of the square training crop; at inference the longer image side is
            resized to this (the training crops see the image at the same base scale).
        epochs: passes over the pool.
        batch_size: images per step and per process (DDP: per GPU; at least 2 because of the
            BatchNorm in the ASPP pooling branch).
        lr: base learning rate of SGD with momentum, decayed by the poly schedule.
        momentum, weight_decay: SGD settings (DeepLab defaults).
        poly_power: ``lr_t = lr * (1 - t / T) ** poly_power``.
        scale_range: random scale applied on top of the base scale before the crop.
        flip: random horizontal flip.
        seed: model initialisation, sampling order and augmentation are all derived from it,
            so a resumed run repeats an uninterrupted one.
        num_workers: DataLoader worker processes.
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler);
            ignored on a CPU.
    """

    encoder: str = "resnet50"
    encoder_weights: str | None = "imagenet"
    image_size: int = 512
    epochs: int = 20
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    seed: int = 0
    num_workers: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        if self.encoder_weights not in ENCODER_WEIGHTS:
            raise ValueError(
                f"encoder_weights must be 'imagenet' or None, got {self.encoder_weights!r}"
            )
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(
                f"image_size must be a positive multiple of 32 (DeepLabV3+ input), "
                f"got {self.image_size}"
            )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(
                "batch_size must be >= 2 (the BatchNorm of DeepLabV3+'s ASPP pooling branch "
                f"needs two samples), got {self.batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(
                f"scale_range must be (low, high) with 0 < low <= high, got {low, high}"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class MapFitConfig:
    """StableSeg++: fitting one non-negative weight per attention map.

    The weight of layer l is ``exp(theta_l)``; the fitted probabilities are the segmenter's own,
    ``P = normalise(sum_l w_l * map_l)`` (CAPM + SAPM without a softmax), and the loss is the
    cross-entropy ``-log P[target]`` against the StableSeg+ student's predictions.

    Attributes:
        steps: Adam steps.
        lr: Adam learning rate on theta (log-weights).
        pixels_per_image: pixels sampled from each image's cached maps (at the common size).
        max_pixels: cap on all sampled pixels (memory: pixels x layers x classes x 2 bytes).
        batch_pixels: pixels per Adam step.
        init_floor: layers the uniform plan leaves out start at this fraction of the mean
            uniform weight, so every layer can grow.
        seed: pixel sampling and batches.
    """

    steps: int = 300
    lr: float = 0.05
    pixels_per_image: int = 1024
    max_pixels: int = 262_144
    batch_pixels: int = 8192
    init_floor: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "pixels_per_image", "max_pixels", "batch_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.init_floor <= 1:
            raise ValueError(f"init_floor must be in (0, 1], got {self.init_floor}")


@dataclass(frozen=True)
class PseudoConfig:
    """Pseudo-masks for the student: CRF, uncertain pixels, working resolution.

    Attributes:
        crf: run DenseCRF on the pseudo probabilities.
        crf_config: DenseCRF parameters.
        uncertain_threshold: pixels whose best (CRF) probability is below this become 255.
            None: 0.6 with CRF, and no pixel ignored without CRF (the raw StableSeg
            probabilities are much flatter, a fixed threshold would ignore most pixels).
        max_side: images whose longer side exceeds this are downscaled for CRF and training
            (pseudo-masks are stored at that working size).
    """

    crf: bool = True
    crf_config: CRFConfig = field(default_factory=CRFConfig)
    uncertain_threshold: float | None = None
    max_side: int = 1024

    def __post_init__(self) -> None:
        thr = self.uncertain_threshold
        if thr is not None and not 0.0 <= thr <= 1.0:
            raise ValueError(f"uncertain_threshold must be in [0, 1] or None, got {thr}")
        if self.max_side < 32:
            raise ValueError(f"max_side must be >= 32, got {self.max_side}")

    @property
    def threshold(self) -> float | None:
        """The uncertain-pixel threshold in effect."""
        if self.uncertain_threshold is not None:
            return self.uncertain_threshold
        return 0.6 if self.crf else None

    def replace(self, **changes: Any) -> PseudoConfig:
        return replace(self, **changes)


STAGES = ("plus", "plusplus")
# the steps of each stage, in order; "stableseg" always runs first
STEPS = {
    "stableseg": ("stableseg",),
    "plus": ("plus.pseudo", "plus.train", "plus.predict"),
    "plusplus": ("plusplus.fit", "plusplus.pseudo", "plusplus.train", "plusplus.predict"),
}
DTYPES = {None: None, "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class RefineOptions:
    """Everything a refine run needs besides the pool and the work dir.

    Attributes:
        model: Stable Diffusion hub id or local diffusers folder.
        labels: label names; mask id k is ``labels[k - 1]``.
        stages: which of ``STAGES`` run after the StableSeg pseudo-masks (stage 1, always
            run); empty (or ``("stableseg",)``) for stage 1 alone.
        device: None: CUDA when present (one GPU per process under DDP), else CPU.
        dtype: of Stable Diffusion: ``"fp16"``, ``"bf16"``, ``"fp32"`` or None (fp16 on CUDA).
        segmenter, pseudo, student, map_fit: the parts' own configurations.
        val_gt: ground-truth mask folder, for mIoU in the report only.
        progress: show progress bars (process 0 only).
    """

    model: str
    labels: tuple[str, ...]
    stages: tuple[str, ...] = STAGES
    device: str | None = None
    dtype: str | None = None
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    map_fit: MapFitConfig = field(default_factory=MapFitConfig)
    val_gt: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(validate_labels(list(self.labels))))
        if len(self.labels) > 254:
            raise ValueError(f"at most 254 labels fit a mask, got {len(self.labels)}")
        unknown = [s for s in self.stages if s not in ("stableseg", *STAGES)]
        if unknown:
            raise ValueError(
                f"unknown stages {unknown}; choose from {['stableseg', *STAGES]} "
                "(stableseg, the pseudo-masks and cache, always runs first)"
            )
        object.__setattr__(self, "stages", tuple(s for s in STAGES if s in self.stages))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES, key=str)}, got {self.dtype!r}")

    @property
    def background(self) -> bool:
        segmenter = self.segmenter
        return segmenter.background_threshold is not None or segmenter.background_prompt is not None

    def settings(self) -> dict[str, Any]:
        """What decides the results: a rerun into the same work dir must match it."""
        segmenter = asdict(self.segmenter)
        segmenter.pop("batch_size")
        return json.loads(
            json.dumps(
                {
                    "model": self.model,
                    "dtype": self.dtype,
                    "labels": list(self.labels),
                    "segmenter": segmenter,
                    "pseudo": asdict(self.pseudo),
                    "student": {
                        k: v for k, v in asdict(self.student).items() if k != "num_workers"
                    },
                    "map_fit": asdict(self.map_fit),
                }
            )
        )

    def steps(self) -> list[str]:
        """Every step of this run, in order."""
        return [step for group in ("stableseg", *self.stages) for step in STEPS[group]]
