"""Pseudo-label a folder: per-image results stored as they finish, exports assembled at the end.

Layout of OUT_DIR:

    run.json              the settings of the run (a rerun must match them, or use --overwrite)
    masks/<rel>.png       indexed PNG per image (0 background, k = k-th label, 255 ignore)
    records/<rel>.json    per-image record, written last: its presence means "done"
    preview/<rel>.jpg     overlays (--preview), preview/index.html gallery
    coco.json, labelstudio.json, labelmap.txt, classes.json, skipped.jsonl

Every file is written atomically, so a kill at any moment leaves either the old file or the new
one; a rerun labels only the images without a record and rebuilds the exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np

from labeler.config import ModelSpec, SegmenterConfig

from .distributed import Distributed
from .io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    RunMismatchError,
    Skipped,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_run_file,
    image_bytes,
    list_images,
    open_image,
    read_jsonl,
    remove_stale_temporaries,
    write_jsonl,
)

log = logging.getLogger(__name__)

FORMATS = ("coco", "png", "labelstudio")
RUN_FILE = "run.json"
RUN_FORMAT = "stableseg-pseudo-label/2"


class Segmenter(Protocol):
    """What the job needs of a model: StableSeg, or a trained student."""

    model_version: str

    def segment(
        self, images: Any, labels: Sequence[str], *, return_probs: bool = False
    ) -> list[Any]: ...


__all__ = ["NoImagesError", "PseudoLabelOptions", "RunMismatchError", "Summary", "run"]


class NoImagesError(ValueError):
    """The image folder holds no image at all."""


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
    workers: int = 2

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


@dataclass
class Summary:
    total: int = 0
    labelled: int = 0
    already_done: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 3 if self.skipped else 0


# ---------------------------------------------------------------------------- paths
def stem_path(relative: Path) -> PurePosixPath:
    """``a/b/c.jpg`` -> ``a/b/c``: the key of an image's outputs."""
    return PurePosixPath(relative.as_posix()).with_suffix("")


def mask_path(out_dir: Path, relative: Path) -> Path:
    return out_dir / "masks" / f"{stem_path(relative)}.png"


def record_path(out_dir: Path, relative: Path) -> Path:
    return out_dir / "records" / f"{stem_path(relative)}.json"


def preview_path(out_dir: Path, relative: Path) -> Path:
    return out_dir / "preview" / f"{stem_path(relative)}.jpg"


# ---------------------------------------------------------------------------- planning
def check_run(options: PseudoLabelOptions) -> dict[str, Any]:
    """Compare the options with OUT_DIR/run.json. Returns the signature to write."""
    signature = options.signature()
    if not options.overwrite:
        check_run_file(
            options.out_dir / RUN_FILE,
            signature,
            "Use another --out, or --overwrite to start it again.",
        )
    return signature


def discover(options: PseudoLabelOptions) -> tuple[list[Path], list[Skipped]]:
    """The input images, and those refused up front (outputs that would collide)."""
    images = list_images(options.images_dir)
    owners: dict[PurePosixPath, Path] = {}
    keep, refused = [], []
    for relative in images:
        key = stem_path(relative)
        if key in owners:
            refused.append(
                Skipped(
                    relative.as_posix(),
                    f"its mask name {key}.png is already taken by {owners[key].as_posix()}",
                )
            )
            continue
        owners[key] = relative
        keep.append(relative)
    return keep, refused


# ---------------------------------------------------------------------------- labelling
def _load(options: PseudoLabelOptions, relative: Path) -> tuple[Path, Any]:
    try:
        return relative, open_image(options.images_dir / relative, options.max_pixels)
    except ImageError as err:
        return relative, err


def _prefetch(
    options: PseudoLabelOptions, items: Sequence[Path], batch: int
) -> Iterator[list[tuple[Path, Any]]]:
    """Batches of (relative path, PIL image or ImageError), decoded in background threads."""
    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
        loaded = pool.map(lambda r: _load(options, r), items)
        chunk: list[tuple[Path, Any]] = []
        for item in loaded:
            chunk.append(item)
            if len(chunk) == batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _gt_labels(options: PseudoLabelOptions, relative: Path) -> list[int]:
    """1-based ids of the labels present in this image's ground truth (paper's protocol)."""
    from exporters.png import png_to_mask

    assert options.labels_from_gt is not None
    path = options.labels_from_gt / f"{stem_path(relative)}.png"
    if not path.exists():
        raise ImageError(f"no ground-truth mask {path} for --labels-from-gt")
    gt = png_to_mask(open_image(path))
    return [int(i) for i in np.unique(gt) if 1 <= i <= len(options.labels)]


def _segment_batch(
    model: Segmenter, options: PseudoLabelOptions, images: list[Any], relatives: list[Path]
) -> list[Any]:
    """Segment with every label, or (labels_from_gt) with each image's own labels."""
    if options.labels_from_gt is None:
        return model.segment(images, options.labels, return_probs=options.crf)
    from labeler.result import SegmentationResult

    results = []
    for image, relative in zip(images, relatives, strict=True):
        ids = _gt_labels(options, relative)
        width, height = image.size
        mask = np.zeros((height, width), np.uint8)
        probs = np.zeros((len(options.labels), height, width), np.float32) if options.crf else None
        scores = dict.fromkeys(options.labels, 0.0)
        background = evidence = None
        if ids:
            subset = [options.labels[i - 1] for i in ids]
            sub = model.segment([image], subset, return_probs=options.crf)[0]
            lookup = np.array([0, *ids], dtype=np.uint8)
            mask = np.where(sub.mask == 255, 255, lookup[np.minimum(sub.mask, len(ids))])
            if probs is not None:
                probs[[i - 1 for i in ids]] = sub.probs
            scores.update(sub.scores)
            background, evidence = sub.background, sub.evidence
        results.append(
            SegmentationResult(
                mask.astype(np.uint8),
                probs,
                options.labels,
                scores,
                background=background,
                evidence=evidence,
            )
        )
    return results


def _apply_crf(result: Any, rgb: np.ndarray, threshold: float | None) -> Any:
    from labeler.crf import crf_segmentation

    return crf_segmentation(result, rgb, threshold)


PREVIEW_MIN_SIDE = 256


def _preview_size(image: Any, mask: np.ndarray) -> tuple[Any, np.ndarray]:
    """Small images are enlarged (nearest, whole factor) so the legend stays readable."""
    from PIL import Image

    factor = -(-PREVIEW_MIN_SIDE // max(image.size))  # ceil
    if factor <= 1:
        return image, mask
    size = (image.width * factor, image.height * factor)
    return image.resize(size, Image.Resampling.NEAREST), np.kron(
        mask, np.ones((factor, factor), mask.dtype)
    )


def _store(options: PseudoLabelOptions, relative: Path, image: Any, result: Any, version: str):
    """Write one image's mask, preview and (last) record."""
    from exporters.png import mask_to_png

    atomic_write_bytes(mask_path(options.out_dir, relative), image_bytes(mask_to_png(result.mask)))
    if options.preview:
        from exporters.preview import overlay

        picture = overlay(*_preview_size(image.convert("RGB"), result.mask), options.labels)
        data = image_bytes(picture, "JPEG", quality=88)
        atomic_write_bytes(preview_path(options.out_dir, relative), data)
    record = {
        "file": relative.as_posix(),
        "width": int(result.mask.shape[1]),
        "height": int(result.mask.shape[0]),
        "labels_present": [options.labels[i - 1] for i in result.present_labels()],
        "scores": {k: round(float(v), 6) for k, v in result.scores.items()},
        "model_version": version,
    }
    atomic_write_json(record_path(options.out_dir, relative), record)


def label_images(
    get_model: Callable[[], Segmenter],
    options: PseudoLabelOptions,
    pending: Sequence[Path],
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, list[Skipped]]:
    """Label ``pending`` images; returns (labelled count, skipped).

    ``get_model`` is called once, when the first readable image comes: a rerun whose only
    pending images are broken files does not load the model.
    """
    from labeler.images import to_rgb_array

    labelled, skipped = 0, []
    model: Segmenter | None = None
    for batch in _prefetch(options, pending, options.segmenter.batch_size):
        good = [(rel, img) for rel, img in batch if not isinstance(img, Exception)]
        skipped += [
            Skipped(rel.as_posix(), str(img)) for rel, img in batch if isinstance(img, Exception)
        ]
        if good:
            model = model or get_model()
            try:
                results = _segment_batch(
                    model, options, [img for _, img in good], [r for r, _ in good]
                )
            except ImageError as err:  # a missing GT mask under --labels-from-gt
                results = None
                skipped += [Skipped(rel.as_posix(), str(err)) for rel, _ in good]
            for (relative, image), result in zip(good, results or [], strict=False):
                if options.crf:
                    rgb = to_rgb_array(image)
                    result = _apply_crf(result, rgb, options.segmenter.background_threshold)
                _store(options, relative, image, result, model.model_version)
                labelled += 1
        if on_progress is not None:
            on_progress(len(batch))
    return labelled, skipped


# ---------------------------------------------------------------------------- exports
def assemble_exports(options: PseudoLabelOptions, images: Sequence[Path]) -> dict[str, str]:
    """Rebuild every export from the stored masks and records of ``images``. Returns paths."""
    from exporters import (
        brush_prediction,
        build_coco,
        build_import_file,
        classes_json,
        coco_annotations,
        coco_image,
        gallery_html,
        image_url,
        import_task,
        labelmap_text,
        png_to_mask,
    )

    out = options.out_dir
    labels = options.labels
    outputs = {"masks": str(out / "masks")}
    atomic_write_text(out / "labelmap.txt", labelmap_text(labels))
    atomic_write_json(out / "classes.json", classes_json(labels), indent=2)
    outputs["labelmap"] = str(out / "labelmap.txt")

    want_coco, want_ls = "coco" in options.formats, "labelstudio" in options.formats
    coco_images, annotations, tasks, gallery = [], [], [], []
    root_url = options.image_root_url or f"/data/local-files/?d={Path(options.images_dir).name}"
    for relative in images:
        rec_file = record_path(out, relative)
        if not rec_file.exists():
            continue
        record = json.loads(rec_file.read_text())
        if options.preview:
            gallery.append(
                {
                    "overlay": f"{stem_path(relative)}.jpg",
                    "file_name": record["file"],
                    "labels": record["labels_present"],
                }
            )
        if not (want_coco or want_ls):
            continue
        from PIL import Image

        with Image.open(mask_path(out, relative)) as png:
            mask = png_to_mask(png)
        scores = record["scores"]
        if want_coco:
            image_id = len(coco_images) + 1
            coco_images.append(
                coco_image(image_id, record["file"], record["width"], record["height"])
            )
            per_label = [float(scores.get(name, 0.0)) for name in labels]
            annotations += coco_annotations(
                mask, image_id, len(annotations) + 1, len(labels), scores=per_label
            )
        if want_ls:
            task = import_task(
                image_url(root_url, record["file"]),
                brush_prediction(mask, labels, scores, record["model_version"]),
            )
            tasks.append(task)
    if want_coco:
        coco = build_coco(
            coco_images, annotations, labels, info={"description": "StableSeg pseudo-labels"}
        )
        atomic_write_json(out / "coco.json", coco)
        outputs["coco"] = str(out / "coco.json")
    if want_ls:
        atomic_write_json(out / "labelstudio.json", build_import_file(tasks))
        outputs["labelstudio"] = str(out / "labelstudio.json")
    if options.preview:
        atomic_write_text(out / "preview" / "index.html", gallery_html(gallery))
        outputs["preview"] = str(out / "preview" / "index.html")
    return outputs


# ---------------------------------------------------------------------------- the run
def load_model(options: PseudoLabelOptions, device: str | None) -> Segmenter:
    """StableSeg from --model (with --weights), or the trained student from --student."""
    if options.student is not None:
        return _StudentAdapter(options, device or options.model.device)
    from .models import load_stableseg

    return load_stableseg(options.model, options.segmenter, device)


class _StudentAdapter:
    """A trained DeepLabV3+ (``refine``'s output) behind the Segmenter protocol.

    The student runs at the size it was trained at; ``--image-size`` applies to StableSeg.
    """

    def __init__(self, options: PseudoLabelOptions, device: str | None) -> None:
        from labeler.train.student import load_student

        assert options.student is not None
        folder = Path(options.student)
        self.student = load_student(folder, device=device)
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        self.model_version = f"student-{digest.hexdigest()[:12]}"

    def segment(
        self, images: Any, labels: Sequence[str], *, return_probs: bool = False
    ) -> list[Any]:
        from labeler.train.student import student_segment

        return student_segment(self.student, images, labels)  # probs always (full-size logits)


def run(
    options: PseudoLabelOptions,
    progress: Callable[[int, int], Any] | None = None,
    model: Segmenter | None = None,
) -> Summary:
    """Label every image of the folder that is not done yet, then rebuild the exports.

    Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) each process labels its share
    and process 0 assembles the exports once all are done.

    Args:
        progress: ``progress(total, initial)`` returns an object with ``update(n)`` and
            ``close()`` (a tqdm bar); only process 0 shows one.
        model: an already loaded segmenter (the model options are then not used to load one).
    """
    started = time.monotonic()
    unknown = sorted(set(options.formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown --format {unknown}; choose from {list(FORMATS)}")
    signature = check_run(options)
    images, refused = discover(options)
    if not images and not refused:
        raise NoImagesError(
            f"no images under {options.images_dir} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "recursively; hidden files and folders are left out)"
        )
    dist = Distributed.from_environment(options.model.device)
    out = options.out_dir
    fresh = options.overwrite or not (out / RUN_FILE).exists()
    if options.overwrite:
        pending = list(images)
    else:
        pending = [r for r in images if not record_path(out, r).exists()]
    mine = pending[dist.rank :: dist.world_size]
    loaded = model
    if fresh and mine and loaded is None:
        # A new run writes nothing into OUT_DIR before its model has loaded: a model that
        # cannot load leaves no run.json behind to refuse the corrected command.
        loaded = load_model(options, dist.device())
    if dist.is_main:
        if options.overwrite:
            for sub in ("records", "masks", "preview"):
                shutil.rmtree(out / sub, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, signature, indent=2)
    dist.barrier()

    summary = Summary(total=len(images) + len(refused), already_done=len(images) - len(pending))
    bar = progress(len(mine), 0) if (progress is not None and dist.is_main) else None

    def get_model() -> Segmenter:
        return loaded or load_model(options, dist.device())

    labelled, skipped = label_images(get_model, options, mine, bar.update if bar else None)
    if bar is not None:
        bar.close()
    part = options.out_dir / ".parts" / f"rank{dist.rank}.jsonl"
    write_jsonl(part, [{"labelled": labelled}, *(s.to_dict() for s in skipped)])
    dist.barrier()

    if dist.is_main:
        all_skipped = list(refused)
        total_labelled = 0
        for rank in range(dist.world_size):
            rows = list(read_jsonl(options.out_dir / ".parts" / f"rank{rank}.jsonl"))
            total_labelled += sum(r.get("labelled", 0) for r in rows)
            all_skipped += [Skipped(r["path"], r["reason"]) for r in rows if "path" in r]
        shutil.rmtree(options.out_dir / ".parts", ignore_errors=True)
        all_skipped.sort(key=lambda s: s.path)
        write_jsonl(options.out_dir / "skipped.jsonl", [s.to_dict() for s in all_skipped])
        summary.labelled, summary.skipped = total_labelled, all_skipped
        summary.outputs = assemble_exports(options, images)
        summary.outputs["skipped"] = str(options.out_dir / "skipped.jsonl")
        remove_stale_temporaries(options.out_dir)  # left-overs of a killed run
    dist.barrier()
    dist.close()
    summary.seconds = time.monotonic() - started
    return summary


def summary_dict(summary: Summary) -> dict[str, Any]:
    data = asdict(summary)
    data["skipped"] = len(summary.skipped)
    return data
