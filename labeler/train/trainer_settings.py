"""Every default of the StableSeg+ / StableSeg++ trainer in one place (the refine job's own options,
its stages and folders live in ``labeler.jobs.refine``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..crf import CRFConfig

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
