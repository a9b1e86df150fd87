"""Where each output of a ``pseudo-label`` run lives in OUT_DIR.

    run.json              the settings of the run (a rerun must match them, or use --overwrite)
    masks/<rel>.png       indexed PNG per image (0 background, k = k-th label, 255 ignore)
    pieces/<rel>.jsonl    the image's COCO annotations and Label Studio prediction, ready to
                          be numbered and streamed into coco.json / labelstudio.json
    objects/<rel>.png     the image's object mask for --format cvat-mask (one id per
                          connected component of each label, VOC colours)
    void-free/<rel>.png   CVAT's class mask of an image whose mask has ignore (255) pixels,
                          which the CVAT label map has no colour for: they become background
    records/<rel>.json    per-image record, written last: its presence means "done"
    preview/<rel>.jpg     overlays (--preview), preview/index.html gallery
    coco.json, labelstudio.json, labelmap.txt, classes.json, skipped.jsonl
    cvat-mask.zip, hf/, hf-parquet/   the dataset-shaped exports (labeler.jobs.dataset_exports)

``<rel>`` is the image's path relative to IMAGES_DIR without its extension. OUT_DIR may be a
folder in object storage (:mod:`labeler.jobs.storage`): the same names under its prefix.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from .storage import Location

RUN_FILE = "run.json"
PER_IMAGE_FOLDERS = ("records", "masks", "pieces", "objects", "void-free", "preview")


def stem_path(relative: Path) -> PurePosixPath:
    """``a/b/c.jpg`` -> ``a/b/c``: the key of an image's outputs."""
    return PurePosixPath(relative.as_posix()).with_suffix("")


def mask_path(out_dir: Location, relative: Path) -> Location:
    return out_dir / "masks" / f"{stem_path(relative)}.png"


def pieces_path(out_dir: Location, relative: Path) -> Location:
    return out_dir / "pieces" / f"{stem_path(relative)}.jsonl"


def objects_path(out_dir: Location, relative: Path) -> Location:
    return out_dir / "objects" / f"{stem_path(relative)}.png"


def void_free_path(out_dir: Location, relative: Path) -> Location:
    return out_dir / "void-free" / f"{stem_path(relative)}.png"


def record_path(out_dir: Location, relative: Path) -> Location:
    return out_dir / "records" / f"{stem_path(relative)}.json"


def preview_path(out_dir: Location, relative: Path) -> Location:
    return out_dir / "preview" / f"{stem_path(relative)}.jpg"
