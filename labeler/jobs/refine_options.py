"""What a refine run is asked to do: the pool's labels, the model and segmenter, the stages, and
the trainer's own configurations. The run's own choices are declared here
(:func:`labeler.settings.setting`); with the trainer's groups they make ``refine``'s options."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from labeler.labels import labels_record, validate_labels
from labeler.model_settings import ModelSpec, SegmenterConfig
from labeler.settings import group, setting, settings_group
from labeler.train.trainer_settings import MapFitConfig, PseudoConfig, StudentConfig

FIRST_STAGE = "stableseg"
"""StableSeg's pseudo-masks and the attention-map cache: every run starts with it."""
STAGES = ("plus", "plusplus")
"""The self-training stages a run may add, in order (StableSeg++ needs StableSeg+)."""
PLUSPLUS_MASKS = ("exact", "cache")
"""How StableSeg++ makes its pseudo-masks: ``exact`` runs StableSeg with the learned weights
(the UNet again, in batches); ``cache`` rebuilds them from the stage-1 cache (no UNet pass, but
the cached self-attention maps were seeded by the uniform weights' CA map)."""
_STORED_STUDENT_NAMES = {"crop_size": "image_size", "train_batch_size": "batch_size"}
"""run.json keeps the student fields' earlier names, so runs started by earlier versions resume."""


def parse_stages(value: str) -> tuple[str, ...]:
    """``"stableseg,plus,plusplus"`` -> the stages, checked (``stableseg`` always runs)."""
    names = tuple(s.strip() for s in value.split(",") if s.strip())
    valid = (FIRST_STAGE, *STAGES)
    bad = [s for s in names if s not in valid]
    if bad or not names:
        raise ValueError(
            f"unknown stage(s) {bad or value!r}; give a comma-separated subset of "
            f"{', '.join(valid)}"
        )
    return names


def _format_stages(stages: tuple[str, ...]) -> str:
    return ",".join(dict.fromkeys((FIRST_STAGE, *stages)))


@dataclass(frozen=True)
class ImageLabels:
    """Per-image labels: each pool image is prompted with its own labels only.

    Attributes:
        source: where they came from, for messages and the report (``--labels-from-gt DIR``).
        ids: pool image key -> the 1-based ids (into ``RefineOptions.labels``) it is prompted
            with, ascending. An image without an entry, or with no id, is skipped in stage 1.
    """

    source: str
    ids: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        clean = {}
        for key, ids in self.ids.items():
            values = tuple(sorted({int(i) for i in ids}))
            if any(i < 1 for i in values):
                raise ValueError(f"{self.source}: image {key} has label ids {list(ids)} below 1")
            clean[str(key)] = values
        object.__setattr__(self, "ids", clean)

    def digest(self) -> str:
        """A short hash of the whole mapping (run.json compares it; the mapping is in
        ``W/image_labels.json``)."""
        blob = json.dumps({k: list(v) for k, v in sorted(self.ids.items())})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        return {"source": self.source, "images": len(self.ids), "sha256": self.digest()}

    def to_json(self) -> str:
        """The mapping as JSON text, one image a line, sorted by key."""
        lines = [f"{json.dumps(k)}: {json.dumps(list(v))}" for k, v in sorted(self.ids.items())]
        return "{\n" + ",\n".join(lines) + "\n}\n"


@settings_group("refine")
@dataclass(frozen=True)
class RefineOptions:
    """Everything a refine run needs besides the pool and the work dir.

    Attributes:
        labels: label names; mask id k is ``labels[k - 1]``.
        model: the Stable Diffusion to load (source, device, dtype); the students train on the
            same device (one GPU per process under DDP).
        stages: which of :data:`STAGES` run after the StableSeg pseudo-masks (always run);
            empty (or ``("stableseg",)``) for that first stage alone.
        segmenter, pseudo, student, map_fit: the parts' own configurations; the weight fit
            takes the student's seed (one seed a run, ``--seed``).
        val_gt: ground-truth mask folder, for mIoU in the report only.
        image_labels: per-image labels (``--labels-from-gt`` / ``--image-labels``); None: every
            image is prompted with every label.
        plusplus_masks: one of :data:`PLUSPLUS_MASKS`.
        progress: show progress bars (process 0 only).
    """

    labels: tuple[str, ...]
    model: ModelSpec = field(default_factory=ModelSpec)
    stages: tuple[str, ...] = field(
        default=STAGES,
        metadata=setting(
            "Stages to run: stableseg (pseudo-masks and attention cache; always runs first), "
            "plus (CRF + DeepLabV3+), plusplus (learned map weights + DeepLabV3+ again).",
            parse=parse_stages,
            format=_format_stages,
            metavar="STAGES",
        ),
    )
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig, metadata=group())
    student: StudentConfig = field(default_factory=StudentConfig, metadata=group())
    map_fit: MapFitConfig = field(default_factory=MapFitConfig, metadata=group())
    val_gt: Path | None = field(
        default=None,
        metadata=setting(
            "Ground-truth masks (<relative path>.png, 0 background, k = k-th label, 255 ignore) "
            "to report mIoU after each stage; never used for training. Given to a rerun of a "
            "finished run, it scores that run without training anything again.",
            path="dir",
            exists=True,
        ),
    )
    image_labels: ImageLabels | None = None
    plusplus_masks: str = field(
        default=PLUSPLUS_MASKS[0],
        metadata=setting(
            "StableSeg++ pseudo-masks: exact runs StableSeg with the learned weights (one more "
            "UNet pass per image); cache rebuilds them from the stage-1 cache (no UNet, but SAR "
            "keeps the uniform weights' seed). The report counts the pixels the two disagree on "
            "(exact).",
            choices=PLUSPLUS_MASKS,
        ),
    )
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(validate_labels(list(self.labels))))
        object.__setattr__(self, "map_fit", replace(self.map_fit, seed=self.student.seed))
        unknown = [s for s in self.stages if s not in (FIRST_STAGE, *STAGES)]
        if unknown:
            raise ValueError(
                f"unknown stages {unknown}; choose from {[FIRST_STAGE, *STAGES]} "
                f"({FIRST_STAGE}, the pseudo-masks and cache, always runs first)"
            )
        object.__setattr__(self, "stages", tuple(s for s in STAGES if s in self.stages))
        if self.segmenter.tiles is not None:
            raise ValueError(
                "refine caches one set of attention maps per image for StableSeg++, which tiles "
                "do not make: leave --tiles off for refine (pseudo-label, benchmark and serve "
                "take it)"
            )
        if self.plusplus_masks not in PLUSPLUS_MASKS:
            raise ValueError(
                f"plusplus_masks must be one of {', '.join(PLUSPLUS_MASKS)}, "
                f"got {self.plusplus_masks!r}"
            )
        if self.image_labels is not None:
            chosen = self.image_labels.ids.items()
            too_high = [(k, v) for k, v in chosen if v and v[-1] > len(self.labels)]
            if too_high:
                key, ids = too_high[0]
                raise ValueError(
                    f"{self.image_labels.source}: image {key} has label id {ids[-1]} but there "
                    f"are {len(self.labels)} labels"
                )

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
                    **labels_record(self.labels),
                    "segmenter": self.segmenter.mask_settings(),
                    "pseudo": asdict(self.pseudo),
                    "student": {
                        _STORED_STUDENT_NAMES.get(k, k): v
                        for k, v in asdict(self.student).items()
                        if k != "workers"
                    },
                    "map_fit": asdict(self.map_fit),
                    "image_labels": self.image_labels.settings() if self.image_labels else None,
                    "plusplus_masks": self.plusplus_masks,
                }
            )
        )
