"""What a ``pseudo-label`` run is asked to do: the folders and labels, the model and segmenter,
and the job's own choices, declared here (:func:`labeler.settings.setting`): ``pseudo-label``'s
options are made from them. Its own module so that the job (:mod:`labeler.jobs.pseudo_label`) and
the exports it streams (:mod:`labeler.jobs.exports`) both import it without importing each
other."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters.polygons import DEFAULT_MIN_AREA, DEFAULT_TOLERANCE
from labeler.images import DEFAULT_MAX_PIXELS
from labeler.labels import labels_record
from labeler.model_settings import ModelSpec, SegmenterConfig
from labeler.settings import integer, number, setting, settings_group

from .pipeline import MAX_DEFAULT_WORKERS, default_workers
from .storage import Location, as_location, describe, parse_location

FORMATS = (
    "coco",
    "png",
    "labelstudio",
    "cvat-mask",
    "hf",
    "coco-polygons",
    "yolo-seg",
    "labelstudio-polygons",
)
POLYGON_FORMATS = ("coco-polygons", "yolo-seg", "labelstudio-polygons")
"""The formats made of objects (:mod:`exporters.polygons`): ``--min-area`` and
``--polygon-tolerance`` shape them."""
ENGINES = ("local", "ray")
RUN_FORMAT = "stableseg-pseudo-label/2"


@settings_group("pseudo-label")
@dataclass(frozen=True)
class PseudoLabelOptions:
    """A pseudo-label run: the folders and labels, the model and segmenter, and the job's own
    choices (CRF, formats, previews, ...)."""

    images_dir: Location
    out_dir: Location = field(
        metadata=setting(
            "Output folder (created), or an object storage URL (s3://bucket/run, gs://..., "
            "az://...; see docs/storage.md). Rerunning into it resumes the run.",
            name="out",  # --out; the field says what it holds
            parse=parse_location,
            metavar="DIR|URL",
        )
    )
    labels: list[str]
    model: ModelSpec = field(default_factory=ModelSpec)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    crf: bool = field(
        default=False,
        metadata=setting(
            "Refine the probabilities with DenseCRF (pydensecrf2) before the argmax.",
            switch=True,
            negatable=True,
        ),
    )
    formats: tuple[str, ...] = field(
        default=("coco", "png"),
        metadata=setting(
            "Exports to write (repeatable): coco (COCO RLE, coco.json), png (indexed masks), "
            "labelstudio (labelstudio.json), cvat-mask (CVAT Segmentation mask 1.1 zip), hf "
            "(Hugging Face datasets folder and Parquet; needs the hf extra), coco-polygons "
            "(coco-polygons.json), yolo-seg (Ultralytics YOLO segmentation folder yolo/), "
            "labelstudio-polygons (labelstudio-polygons.json). PNG masks are always written: "
            "they are the per-image record that resuming relies on.",
            name="format",  # --format coco --format png; the field holds them all
            choices=FORMATS,
            multiple=True,
        ),
    )
    min_area: int = field(
        default=DEFAULT_MIN_AREA,
        metadata=setting(
            "Polygon formats: objects (connected components of a label) and holes of fewer "
            "pixels are left out (a hole left out is filled).",
            parse=integer(minimum=1),
            metavar="PIXELS",
        ),
    )
    polygon_tolerance: float = field(
        default=DEFAULT_TOLERANCE,
        metadata=setting(
            "Polygon formats: how far (pixels) a simplified outline may stray from the "
            "pixels' edges; 0.5 keeps them exact, larger values give fewer vertices.",
            parse=number(minimum=0.0),
            metavar="PIXELS",
        ),
    )
    student: Path | None = field(
        default=None,
        metadata=setting(
            "Label with a DeepLabV3+ trained by `refine` (e.g. W/plusplus/student) instead of "
            "StableSeg.",
            path="dir",
            exists=True,
        ),
    )
    preview: bool = field(
        default=False,
        metadata=setting(
            "Write overlays to OUT/preview/ and a gallery OUT/preview/index.html.", switch=True
        ),
    )
    image_root_url: str | None = field(
        default=None,
        metadata=setting(
            "How Label Studio reaches IMAGES_DIR, joined with each relative path in "
            "labelstudio.json.",
            metavar="URL",
            default_text="/data/local-files/?d=<IMAGES_DIR name>",
        ),
    )
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata=setting(
            "Images with more pixels are skipped (listed in skipped.jsonl).",
            parse=integer(minimum=1),
            metavar="PIXELS",
        ),
    )
    labels_from_gt: Path | None = field(
        default=None,
        metadata=setting(
            "Ground-truth mask folder: prompt each image with only the labels present in its "
            "ground truth (the paper's evaluation protocol). Mask ids stay global.",
            path="dir",
            exists=True,
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=setting("Discard a previous run in --out and start again.", switch=True),
    )
    workers: int | None = field(
        default=None,
        metadata=setting(
            "Threads that read images, and threads that write outputs (each pool); the model "
            "runs on the main thread.",
            parse=integer(minimum=1),
            metavar="N",
            default_text=f"the CPUs this process may use, at most {MAX_DEFAULT_WORKERS}",
        ),
    )
    engine: str = field(
        default="local",
        metadata=setting(
            "What runs the labelling: `local` (this process's threads; torchrun/accelerate for "
            "the GPUs of one node) or `ray` (Ray Data over a Ray cluster: reading tasks, an "
            "actor pool of models, writing tasks; needs the `ray` extra).",
            choices=ENGINES,
            metavar="|".join(ENGINES),
        ),
    )
    ray_address: str | None = field(
        default=None,
        metadata=setting(
            "With --engine ray: the cluster to join (`auto`, `ray://HOST:10001`, HOST:6379).",
            metavar="ADDRESS",
            default_text="RAY_ADDRESS, else a Ray started on this machine",
        ),
    )
    ray_min_actors: int = field(
        default=1,
        metadata=setting(
            "With --engine ray: the fewest model actors (each loads the model once).",
            parse=integer(minimum=1),
            metavar="N",
        ),
    )
    ray_max_actors: int | None = field(
        default=None,
        metadata=setting(
            "With --engine ray: the most model actors; each takes one GPU when the cluster has "
            "GPUs.",
            parse=integer(minimum=1),
            metavar="N",
            default_text="the cluster's GPUs, or 1 without GPUs",
        ),
    )
    ray_actor_cpus: float = field(
        default=1.0,
        metadata=setting(
            "With --engine ray: the CPUs each model actor reserves on its node. A model on a "
            "GPU mostly waits for it: less (0.5, or 0 on a machine with few cores) leaves the "
            "CPUs to the reading and writing tasks.",
            parse=number(minimum=0),
            metavar="CPUS",
        ),
    )

    def __post_init__(self) -> None:
        # A URL or path given as text (from Python: an engine, a notebook) becomes a location
        # here, once: the job joins paths with ``/``, on disk and in object storage alike.
        for name in ("images_dir", "out_dir"):
            object.__setattr__(self, name, as_location(getattr(self, name)))
        if self.engine not in ENGINES:
            raise ValueError(f"unknown --engine {self.engine!r}; choose from {list(ENGINES)}")
        if self.ray_max_actors is not None and self.ray_max_actors < self.ray_min_actors:
            raise ValueError(
                f"--ray-max-actors {self.ray_max_actors} is below --ray-min-actors "
                f"{self.ray_min_actors}"
            )

    def thread_count(self) -> int:
        """Threads per pool of the run: ``workers``, or :func:`default_workers` when unset."""
        return self.workers or default_workers()

    def polygon_settings(self) -> dict[str, Any] | None:
        """What shapes the polygon pieces (None when no polygon format is asked for)."""
        if not set(self.formats) & set(POLYGON_FORMATS):
            return None
        return {"min_area": self.min_area, "tolerance": self.polygon_tolerance}

    def signature(self) -> dict[str, Any]:
        """The settings that change the masks; a rerun into the same OUT_DIR must match."""
        segmenter = self.segmenter.mask_settings()
        weights = segmenter.pop("map_weights")
        if weights is not None:
            blob = json.dumps(weights, sort_keys=True).encode()
            segmenter["map_weights_sha256"] = hashlib.sha256(blob).hexdigest()[:16]
        return {
            "format": RUN_FORMAT,
            "images_dir": describe(self.images_dir),
            **labels_record(self.labels),
            "model": str(self.student or self.model.source),
            "student": self.student is not None,
            "segmenter": segmenter,
            "crf": self.crf,
            "labels_from_gt": str(self.labels_from_gt) if self.labels_from_gt else None,
        }
