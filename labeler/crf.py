"""Fully connected CRF (DenseCRF) refinement of per-pixel class probabilities.

StableSeg+ cleans StableSeg's pseudo-masks with DenseCRF (Krähenbühl & Koltun) before they
train DeepLabV3+: a Gaussian (smoothness) kernel and a bilateral (appearance) kernel pull
nearby pixels of similar colour towards the same label. Needs ``pydensecrf`` (the
``pydensecrf2`` package), imported when used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .result import SegmentationResult

PROB_FLOOR = 1e-5  # probabilities are clipped to this before taking -log


@dataclass(frozen=True)
class CRFConfig:
    """DenseCRF parameters.

    The paper cites DenseCRF (Krähenbühl & Koltun, NeurIPS 2011) for StableSeg+ but states no
    parameters; the defaults are this project's choice, values of the kind commonly used for
    DenseCRF post-processing of segmentation maps, not figures from the paper.

    Attributes:
        iterations: mean-field inference steps.
        gaussian_sxy: spatial std (pixels) of the smoothness kernel.
        gaussian_compat: weight of the smoothness kernel (Potts compatibility).
        bilateral_sxy: spatial std (pixels) of the appearance kernel.
        bilateral_srgb: colour std (0..255 intensity units) of the appearance kernel.
        bilateral_compat: weight of the appearance kernel.
    """

    iterations: int = 5
    gaussian_sxy: float = 3
    gaussian_compat: float = 3
    bilateral_sxy: float = 50
    bilateral_srgb: float = 13
    bilateral_compat: float = 10

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"CRFConfig: iterations must be >= 1, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CRFConfig: {name} must be > 0, got {getattr(self, name)}")
        for name in ("gaussian_compat", "bilateral_compat"):
            if getattr(self, name) < 0:
                raise ValueError(f"CRFConfig: {name} must be >= 0, got {getattr(self, name)}")


def _densecrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DenseCRF refinement needs pydensecrf: pip install pydensecrf2"
        ) from error
    return dcrf


def _check_inputs(image_rgb: np.ndarray, probs: np.ndarray, where: str) -> None:
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"{where}: image_rgb must be (H, W, 3), got shape {image_rgb.shape}")
    if image_rgb.dtype != np.uint8:
        raise ValueError(f"{where}: image_rgb must be uint8, got dtype {image_rgb.dtype}")
    if probs.ndim != 3:
        raise ValueError(f"{where}: probs must be (C, H, W), got shape {probs.shape}")
    if probs.shape[1:] != image_rgb.shape[:2]:
        raise ValueError(
            f"{where}: probs spatial size {probs.shape[1:]} does not match image "
            f"{image_rgb.shape[:2]} (H, W)"
        )
    if probs.shape[0] < 1:
        raise ValueError(f"{where}: probs must hold at least one class, got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError(f"{where}: probs contain nan or inf")


def dense_crf(
    image_rgb: np.ndarray, probs: np.ndarray, config: CRFConfig | None = None
) -> np.ndarray:
    """Refined (C, H, W) float32 probabilities of ``probs`` (C, H, W) over ``image_rgb`` (H, W, 3).

    The input probabilities are clipped to ``PROB_FLOOR`` and renormalised over classes before
    their negative log becomes the unary energy; the output sums to 1 over C at each pixel.
    """
    config = config or CRFConfig()
    image_rgb = np.asarray(image_rgb)
    probs = np.asarray(probs)
    _check_inputs(image_rgb, probs, "dense_crf")
    num_classes, height, width = probs.shape
    if num_classes == 1:
        return np.ones_like(probs, dtype=np.float32)

    dcrf = _densecrf()
    clipped = np.clip(probs.astype(np.float32), PROB_FLOOR, None)  # (C, H, W)
    clipped /= clipped.sum(axis=0, keepdims=True)
    unary = np.ascontiguousarray(-np.log(clipped).reshape(num_classes, -1))  # (C, H*W) float32

    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=config.gaussian_sxy, compat=config.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=config.bilateral_sxy,
        srgb=config.bilateral_srgb,
        rgbim=np.array(
            image_rgb, dtype=np.uint8, order="C"
        ),  # a writable copy: pydensecrf needs one
        compat=config.bilateral_compat,
    )
    refined = np.array(crf.inference(config.iterations), dtype=np.float32)  # (C, H*W)
    return refined.reshape(num_classes, height, width)


def crf_segmentation(
    result: SegmentationResult,
    rgb: np.ndarray,
    background_threshold: float | None = None,
    config: CRFConfig | None = None,
) -> SegmentationResult:
    """A segmentation result refined by DenseCRF over its image, background rules kept.

    ``result`` must carry its probabilities (``segment(..., return_probs=True)``): with a
    background prompt or threshold, CRF runs on the (1 + C) distribution of
    :func:`labeler.background.background_first`, so background is a class it refines like the
    labels; without, on the labels' probabilities. The confidences follow the refined maps.
    """
    from .background import background_first
    from .scores import label_scores

    if result.probs is None:
        raise ValueError("crf_segmentation needs the result's probabilities (return_probs=True)")
    if not result.probs.any():  # no label to refine (an image prompted with no label)
        return result
    dtype = result.mask.dtype
    if result.background is not None or background_threshold is not None:
        extended = background_first(
            result.probs, result.background, result.evidence, background_threshold
        )  # (1 + C, H, W)
        refined = dense_crf(rgb, extended, config)
        mask = refined.argmax(axis=0).astype(dtype)  # 0 background, k label k
        probs, background = refined[1:], refined[0]
    else:
        probs = dense_crf(rgb, result.probs, config)  # (C, H, W)
        mask = (probs.argmax(axis=0) + 1).astype(dtype)
        background = None
    return SegmentationResult(
        mask=mask,
        probs=probs,
        labels=list(result.labels),
        scores=label_scores(mask, probs, result.labels),
        background=background,
        evidence=result.evidence,
    )
