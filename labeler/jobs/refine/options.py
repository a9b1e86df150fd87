"""What a refine run is asked to do: the pool's labels, the model and segmenter, the stages, and
the trainer's own configurations."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labeler.config import ModelSpec, SegmenterConfig
from labeler.labels import validate_labels
from labeler.train.config import MapFitConfig, PseudoConfig, StudentConfig

FIRST_STAGE = "stableseg"
"""StableSeg's pseudo-masks and the attention-map cache: every run starts with it."""
STAGES = ("plus", "plusplus")
"""The self-training stages a run may add, in order (StableSeg++ needs StableSeg+)."""


@dataclass(frozen=True)
class RefineOptions:
    """Everything a refine run needs besides the pool and the work dir.

    Attributes:
        labels: label names; mask id k is ``labels[k - 1]``.
        model: the Stable Diffusion to load (source, device, dtype); the students train on the
            same device (one GPU per process under DDP).
        stages: which of :data:`STAGES` run after the StableSeg pseudo-masks (always run);
            empty (or ``("stableseg",)``) for that first stage alone.
        segmenter, pseudo, student, map_fit: the parts' own configurations.
        val_gt: ground-truth mask folder, for mIoU in the report only.
        progress: show progress bars (process 0 only).
    """

    labels: tuple[str, ...]
    model: ModelSpec = field(default_factory=ModelSpec)
    stages: tuple[str, ...] = STAGES
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    map_fit: MapFitConfig = field(default_factory=MapFitConfig)
    val_gt: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(validate_labels(list(self.labels))))
        unknown = [s for s in self.stages if s not in (FIRST_STAGE, *STAGES)]
        if unknown:
            raise ValueError(
                f"unknown stages {unknown}; choose from {[FIRST_STAGE, *STAGES]} "
                f"({FIRST_STAGE}, the pseudo-masks and cache, always runs first)"
            )
        object.__setattr__(self, "stages", tuple(s for s in STAGES if s in self.stages))

    @property
    def background(self) -> bool:
        """Whether background (0) is a class of the pseudo-masks and the students."""
        segmenter = self.segmenter
        return segmenter.background_threshold is not None or segmenter.background_prompt is not None

    def settings(self) -> dict[str, Any]:
        """What decides the results: a rerun into the same work dir must match it."""
        return json.loads(
            json.dumps(
                {
                    "model": self.model.source,
                    "dtype": self.model.dtype,
                    "labels": list(self.labels),
                    "segmenter": self.segmenter.mask_settings(),
                    "pseudo": asdict(self.pseudo),
                    "student": {
                        k: v for k, v in asdict(self.student).items() if k != "num_workers"
                    },
                    "map_fit": asdict(self.map_fit),
                }
            )
        )
