"""StableSeg+ / StableSeg++ self-training, pure compute (the refine job owns the files).

Modules: ``trainer_settings`` (every default), ``data`` (augmentation, dataset), ``model``
(DeepLabV3+), ``loop`` (training), ``student`` (inference: ``load_student``, ``student_segment``),
``pseudo`` (pseudo-masks from cached maps, CRF), ``mapweights`` (StableSeg++ weight fit),
``cache`` (the attention-map cache format), ``report`` (the plot).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MapFitConfig": ".trainer_settings",
    "PseudoConfig": ".trainer_settings",
    "StudentConfig": ".trainer_settings",
    "Student": ".student",
    "load_student": ".student",
    "student_segment": ".student",
    "fit_map_weights": ".mapweights",
    "train_student": ".loop",
    "build_student": ".model",
    "EncoderWeightsUnavailable": ".model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'labeler.train' has no attribute {name!r}")
