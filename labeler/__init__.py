"""StableSeg: zero-shot semantic segmentation from one Stable Diffusion UNet pass.

The public names are imported lazily, so ``import labeler.metrics`` (or the CLI's ``--help``)
does not pay for torch and diffusers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model_settings import SegmenterConfig
    from .result import BACKGROUND, IGNORE, MAX_LABELS, SegmentationResult
    from .segmenter import StableSeg
    from .weights import load_map_weights

_EXPORTS = {
    "BACKGROUND": ".result",
    "IGNORE": ".result",
    "MAX_LABELS": ".result",
    "SegmentationResult": ".result",
    "SegmenterConfig": ".model_settings",
    "StableSeg": ".segmenter",
    "load_map_weights": ".weights",
}

__all__ = [
    "BACKGROUND",
    "IGNORE",
    "MAX_LABELS",
    "SegmentationResult",
    "SegmenterConfig",
    "StableSeg",
    "load_map_weights",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'labeler' has no attribute {name!r}")
