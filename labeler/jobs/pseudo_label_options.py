"""What a ``pseudo-label`` run is asked to do: the folders and labels, the model and segmenter,
and the job's own choices. Its own module so that the job (:mod:`labeler.jobs.pseudo_label`) and
the exports it streams (:mod:`labeler.jobs.exports`) both import it without importing each
other."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labeler.images import DEFAULT_MAX_PIXELS
from labeler.model_settings import ModelSpec, SegmenterConfig

FORMATS = ("coco", "png", "labelstudio")
RUN_FORMAT = "stableseg-pseudo-label/2"


@dataclass(frozen=True)
class PseudoLabelOptions:
    """A pseudo-label run: the folders and labels, the model and segmenter, and the job's own
    choices (CRF, formats, previews, ...)."""

    images_dir: Path
    out_dir: Path
    labels: list[str]
    model: ModelSpec = field(default_factory=ModelSpec)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    crf: bool = False
    formats: tuple[str, ...] = ("coco", "png")
    student: Path | None = None
    preview: bool = False
    image_root_url: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    labels_from_gt: Path | None = None
    overwrite: bool = False
    workers: int | None = None  # threads per pool (reading, writing); None: default_workers()

    def signature(self) -> dict[str, Any]:
        """The settings that change the masks; a rerun into the same OUT_DIR must match."""
        segmenter = self.segmenter.mask_settings()
        weights = segmenter.pop("map_weights")
        if weights is not None:
            blob = json.dumps(weights, sort_keys=True).encode()
            segmenter["map_weights_sha256"] = hashlib.sha256(blob).hexdigest()[:16]
        return {
            "format": RUN_FORMAT,
            "images_dir": str(Path(self.images_dir).resolve()),
            "labels": list(self.labels),
            "model": str(self.student or self.model.source),
            "student": self.student is not None,
            "segmenter": segmenter,
            "crf": self.crf,
            "labels_from_gt": str(self.labels_from_gt) if self.labels_from_gt else None,
        }
