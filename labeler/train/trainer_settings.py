"""Every default of the StableSeg+ / StableSeg++ trainer in one place (the refine job's own options,
its stages and folders live in :mod:`labeler.jobs.refine_options`).

The fields a user sets are declared here (:func:`labeler.settings.setting`): ``refine``'s options
and, for the student, the backend's ``STABLESEG_REFINE_*`` variables (Start Training) are made
from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..crf import CRFConfig
from ..settings import integer, number, setting, settings_group

ENCODER_WEIGHTS = ("imagenet", None)
CRF_UNCERTAIN_THRESHOLD = 0.6
"""The uncertain-pixel threshold with CRF when none is given (see :class:`PseudoConfig`)."""


def _encoder_weights(value: str) -> str | None:
    name = value.strip().lower()
    return None if name == "none" else name


@settings_group("Student (refine, Start Training)", env_prefix="STABLESEG_REFINE_")
@dataclass(frozen=True)
class StudentConfig:
    """How the DeepLabV3+ student is built and trained.

    Attributes:
        encoder: a segmentation_models_pytorch encoder name (``resnet50``, ``resnet18``, ...).
        encoder_weights: ``"imagenet"`` (downloaded by smp from the Hugging Face hub) or None.
        crop_size: side of the square training crop; at inference the longer image side is
            resized to this (the training crops see the image at the same base scale).
        epochs: passes over the pool.
        train_batch_size: images per step and per process (DDP: per GPU; at least 2 because of
            the BatchNorm in the ASPP pooling branch).
        lr: base learning rate of SGD with momentum, decayed by the poly schedule.
        momentum, weight_decay: SGD settings (DeepLab defaults).
        poly_power: ``lr_t = lr * (1 - t / T) ** poly_power``.
        scale_range: random scale applied on top of the base scale before the crop.
        flip: random horizontal flip.
        seed: model initialisation, sampling order and augmentation are all derived from it,
            so a resumed run repeats an uninterrupted one.
        workers: DataLoader worker processes.
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler);
            ignored on a CPU.
    """

    encoder: str = field(
        default="resnet50",
        metadata=setting("smp encoder name (resnet50, resnet18, ...).", metavar="NAME"),
    )
    encoder_weights: str | None = field(
        default="imagenet",
        metadata=setting(
            "Encoder initialisation (imagenet is downloaded from the Hugging Face hub, or read "
            "from its cache).",
            choices=tuple(w or "none" for w in ENCODER_WEIGHTS),
            parse=_encoder_weights,
            format=lambda value: value or "none",
        ),
    )
    crop_size: int = field(
        default=512,
        metadata=setting(
            "Student training crop side (a multiple of 32); at inference the longer side is "
            "resized to it.",
            parse=integer(minimum=32),
            metavar="PX",
            deprecated=("STABLESEG_REFINE_IMAGE_SIZE",),
        ),
    )
    epochs: int = field(
        default=20,
        metadata=setting(
            "Passes over the pool for each student.", parse=integer(minimum=1), metavar="N"
        ),
    )
    train_batch_size: int = field(
        default=8,
        metadata=setting(
            "Student training images per step (per process under torchrun / accelerate launch).",
            parse=integer(minimum=2),
            metavar="N",
        ),
    )
    lr: float = field(
        default=0.01,
        metadata=setting(
            "Base learning rate (SGD with momentum, poly decay).",
            parse=number(above=0.0),
            metavar="LR",
        ),
    )
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    seed: int = field(
        default=0,
        metadata=setting(
            "Student init, sampling and augmentation; refine's weight fit takes it too.",
            parse=integer(),
            metavar="N",
        ),
    )
    workers: int = field(
        default=0,
        metadata=setting(
            "DataLoader worker processes for training.", parse=integer(minimum=0), metavar="N"
        ),
    )
    amp: bool = True

    def __post_init__(self) -> None:
        if self.encoder_weights not in ENCODER_WEIGHTS:
            raise ValueError(
                f"encoder_weights must be 'imagenet' or None, got {self.encoder_weights!r}"
            )
        if self.crop_size < 32 or self.crop_size % 32:
            raise ValueError(
                f"crop_size must be a positive multiple of 32 (DeepLabV3+ input), "
                f"got {self.crop_size}"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.train_batch_size < 2:
            raise ValueError(
                "train_batch_size must be >= 2 (the BatchNorm of DeepLabV3+'s ASPP pooling "
                f"branch needs two samples), got {self.train_batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(
                f"scale_range must be (low, high) with 0 < low <= high, got {low, high}"
            )
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


@settings_group("StableSeg++ weight fit (refine)", name_prefix="map_")
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

    steps: int = field(
        default=300,
        metadata=setting(
            "Optimisation steps of the StableSeg++ weight fit.",
            parse=integer(minimum=1),
            metavar="N",
        ),
    )
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


@settings_group("Pseudo-masks (refine)")
@dataclass(frozen=True)
class PseudoConfig:
    """Pseudo-masks for the student: CRF, uncertain pixels, working resolution.

    Attributes:
        crf: run DenseCRF on the pseudo probabilities.
        crf_config: DenseCRF parameters.
        uncertain_threshold: pixels whose best (CRF) probability is below this become 255.
            None: :data:`CRF_UNCERTAIN_THRESHOLD` with CRF, and no pixel ignored without CRF (the
            raw StableSeg probabilities are much flatter, a fixed threshold would ignore most
            pixels).
        max_side: images whose longer side exceeds this are downscaled for CRF and training
            (pseudo-masks are stored at that working size).
    """

    crf: bool = field(
        default=True,
        metadata=setting("DenseCRF on pseudo-masks.", switch=True, negatable=True),
    )
    crf_config: CRFConfig = field(default_factory=CRFConfig)
    uncertain_threshold: float | None = field(
        default=None,
        metadata=setting(
            "Pseudo-mask pixels whose best (CRF) probability is below this are ignored (255) "
            "in training.",
            parse=number(0.0, 1.0),
            metavar="0..1",
            default_text=f"{CRF_UNCERTAIN_THRESHOLD:g} with --crf, none without",
        ),
    )
    max_side: int = field(
        default=1024,
        metadata=setting(
            "Larger images are downscaled to this longer side for CRF and training.",
            parse=integer(minimum=32),
            metavar="PX",
        ),
    )

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
        return CRF_UNCERTAIN_THRESHOLD if self.crf else None

    def replace(self, **changes: Any) -> PseudoConfig:
        return replace(self, **changes)
