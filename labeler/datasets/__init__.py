"""Dataset presets: class names, ground-truth decoding and the background rule of each dataset.

Pure (no file I/O): ``labeler.jobs.datasets`` finds and reads the files of a preset.

    >>> preset = get_preset("voc")
    >>> preset.num_classes, preset.background_is_class
    (20, False)
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import DatasetPreset, GtEncoding, classes_present, to_dataset_ids
from .presets import PRESETS, folder_preset

__all__ = [
    "PRESETS",
    "DatasetPreset",
    "GtEncoding",
    "classes_present",
    "folder_preset",
    "get_preset",
    "preset_names",
    "to_dataset_ids",
]


def preset_names() -> list[str]:
    """Every name :func:`get_preset` accepts."""
    return [*PRESETS, "folder"]


def get_preset(
    name: str,
    background: bool | None = None,
    labels: Sequence[str] | None = None,
    ignore_index: Sequence[int] = (),
) -> DatasetPreset:
    """The preset called ``name``.

    Args:
        name: one of :func:`preset_names`.
        background: score ground-truth background as a class (True) or not (False); None keeps
            the preset's own rule. Only where the dataset has a background class.
        labels, ignore_index: the class names and extra ignored ids of ``folder`` (only there).

    Raises:
        KeyError: an unknown name (the message lists the valid ones).
        ValueError: labels or ignore_index for a published dataset, no labels for ``folder``,
            or a background rule the dataset does not have.
    """
    if name == "folder":
        if not labels:
            raise ValueError("dataset 'folder' needs its class names (labels)")
        return folder_preset(labels, ignore_index, True if background is None else background)
    if name not in PRESETS:
        raise KeyError(f"unknown dataset {name!r}; choose one of {', '.join(preset_names())}")
    if labels is not None or ignore_index:
        raise ValueError(
            f"dataset {name!r} ships its class names and ignore rule; labels and ignore_index "
            "are for 'folder'"
        )
    preset = PRESETS[name]
    return preset if background is None else preset.with_background(background)
