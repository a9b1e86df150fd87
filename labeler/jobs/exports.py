"""Streamed exports of a ``pseudo-label`` run: per-image pieces, assembled in constant memory.

When an image is done, its writer stores ``pieces/<rel>.jsonl`` next to its mask: its COCO
annotations and its Label Studio prediction, each already serialised, only the ids missing.
JSON lines:

    {"size": [H, W], "coco": 2, "labelstudio": 1}     header: how many lines of each kind
    {"category_id": 1, "segmentation": ..., "area": ..., "bbox": ..., "iscrowd": 0, "score": ...}
    {"category_id": 3, ...}
    {"model_version": ..., "score": ..., "result": [...brush results...]}

A count of null means "not made" (that format was not asked for by the run that wrote it).

:func:`assemble_exports` walks the images in sorted order and streams ``coco.json``,
``labelstudio.json`` and ``preview/index.html`` into temporary files, numbering images and
annotations as it goes (the same ids as building the whole document in memory), then renames
them: memory stays constant whatever the number of images, and no mask is decoded again. An
image whose pieces are missing (a run made by an older version) or lack a format asked for
now has them made from its mask PNG, once, and stored.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .dataset_exports import write_cvat_mask, write_hf
from .io import atomic_write_json, atomic_write_text, atomic_writer, spool_file, stored_stems
from .layout import mask_path, pieces_path, record_path, stem_path
from .pipeline import StageClock
from .pseudo_label_options import PseudoLabelOptions
from .storage import RemotePath

COCO_INFO = {"description": "StableSeg pseudo-labels"}
_COPY_BUFFER = 1 << 20


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class Pieces:
    """One image's export pieces, as serialised JSON texts."""

    size: tuple[int, int]  # (H, W) of the mask
    coco: list[str] | None  # annotations without id / image_id; None: not made
    labelstudio: str | None  # the prediction; None: not made

    def has(self, formats: Iterable[str]) -> bool:
        """Whether every export in ``formats`` can be assembled from these pieces."""
        formats = set(formats)
        return ("coco" not in formats or self.coco is not None) and (
            "labelstudio" not in formats or self.labelstudio is not None
        )

    def text(self) -> str:
        """The pieces file's content."""
        header = {
            "size": list(self.size),
            "coco": None if self.coco is None else len(self.coco),
            "labelstudio": None if self.labelstudio is None else 1,
        }
        lines = [_dumps(header), *(self.coco or [])]
        if self.labelstudio is not None:
            lines.append(self.labelstudio)
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Pieces:
        lines = text.splitlines()
        header = json.loads(lines[0])
        num_coco, num_ls = header["coco"], header["labelstudio"]
        coco = None if num_coco is None else lines[1 : 1 + num_coco]
        labelstudio = None if num_ls is None else lines[1 + (num_coco or 0)]
        if len(lines) != 1 + (num_coco or 0) + (num_ls or 0):
            raise ValueError(f"pieces file has {len(lines)} lines, its header says {header}")
        return cls(tuple(header["size"]), coco, labelstudio)


def make_pieces(
    mask: np.ndarray,
    label_ids: Sequence[int],
    labels: Sequence[str],
    scores: Mapping[str, float],
    model_version: str,
    formats: Iterable[str],
    clock: StageClock | None = None,
    counts: np.ndarray | None = None,
) -> Pieces:
    """The export pieces of one image's mask.

    Args:
        mask: (H, W) ids (0 background, k = ``labels[k - 1]``, 255 ignore).
        label_ids: the label ids present in ``mask`` (1-based, sorted), already validated.
        labels: every label of the run.
        scores: label -> score as the record stores it (rounded): COCO annotations and brush
            results carry the score of their label, as when built from the record.
        model_version: the prediction's model version.
        formats: the exports asked for ("coco", "labelstudio"; others are ignored).
        clock: adds the CPU time of each format's pieces to its stage.
        counts: the pixels of each id of ``mask`` (:func:`exporters.id_counts`), if known.
    """
    from exporters import brush_prediction_json, mask_annotations

    formats = set(formats)
    coco = labelstudio = None
    clock = clock or StageClock()
    if "coco" in formats:
        with clock.measure("coco"):
            per_label = [float(scores.get(name, 0.0)) for name in labels]
            annotations = mask_annotations(mask, len(labels), scores=per_label, label_ids=label_ids)
            coco = [_dumps(annotation) for annotation in annotations]
    if "labelstudio" in formats:
        with clock.measure("labelstudio"):
            labelstudio = brush_prediction_json(
                mask, labels, scores, model_version, label_ids=label_ids, counts=counts
            )
    return Pieces((int(mask.shape[0]), int(mask.shape[1])), coco, labelstudio)


def _pieces_from_mask(options: PseudoLabelOptions, relative: Path, record: dict) -> Pieces:
    """Pieces made again from the stored mask PNG (a run of an older version, or a rerun
    that asks for a format the first run did not), and stored for the next assembly."""
    import io

    from PIL import Image

    from exporters import id_counts, png_to_mask

    with Image.open(io.BytesIO(mask_path(options.out_dir, relative).read_bytes())) as png:
        mask = png_to_mask(png)
    counts = id_counts(mask)
    present = [i for i in range(1, len(options.labels) + 1) if i < counts.size and counts[i]]
    pieces = make_pieces(
        mask,
        present,
        options.labels,
        record["scores"],
        record["model_version"],
        options.formats,
        counts=counts,
    )
    atomic_write_text(pieces_path(options.out_dir, relative), pieces.text())
    return pieces


def load_pieces(options: PseudoLabelOptions, relative: Path, record: dict) -> Pieces:
    """The stored pieces of one done image, made from its mask when missing or incomplete."""
    path = pieces_path(options.out_dir, relative)
    try:
        pieces: Pieces | None = Pieces.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pieces = None
    if pieces is None or not pieces.has(options.formats):
        pieces = _pieces_from_mask(options, relative, record)
    if pieces.size != (record["height"], record["width"]):
        raise ValueError(
            f"{path}: mask size {pieces.size} (H, W) differs from the record's "
            f"{(record['height'], record['width'])}"
        )
    return pieces


class _Section:
    """Items of one JSON array (or HTML list) written to a spool file as they come."""

    def __init__(self, handle: IO[str], separator: str) -> None:
        self.handle, self.separator, self.count = handle, separator, 0

    def add(self, text: str) -> None:
        if self.count:
            self.handle.write(self.separator)
        self.handle.write(text)
        self.count += 1

    def copy_to(self, target: IO[str]) -> None:
        self.handle.flush()
        self.handle.seek(0)
        shutil.copyfileobj(self.handle, target, _COPY_BUFFER)


def default_root_url(options: PseudoLabelOptions) -> str:
    """How ``labelstudio.json`` reaches the images when ``--image-root-url`` is not given:
    Label Studio's local files for a local folder, the bucket URL itself for object storage
    (Label Studio resolves ``s3://`` / ``gs://`` / ``azure-blob://`` URLs through a cloud
    storage connected to the project)."""
    images = options.images_dir
    if isinstance(images, RemotePath):
        return images.url.replace("az://", "azure-blob://", 1)
    return f"/data/local-files/?d={images.name}"


def assemble_exports(options: PseudoLabelOptions, images: Sequence[Path]) -> dict[str, str]:
    """Stream every export of the done ``images`` (sorted order). Returns the output paths.

    The result is byte for byte what ``json.dumps`` of the whole COCO dataset, of the whole
    import file and :func:`exporters.gallery_html` of every entry would write: image ids count
    the done images from 1 in sorted order, annotation ids count their annotations from 1.
    """
    from exporters import (
        classes_json,
        coco_image,
        gallery_figure,
        gallery_head,
        gallery_tail,
        image_url,
        labelmap_text,
    )

    out, labels = options.out_dir, options.labels
    outputs = {"masks": str(out / "masks")}
    atomic_write_text(out / "labelmap.txt", labelmap_text(labels))
    atomic_write_json(out / "classes.json", classes_json(labels), indent=2)
    outputs["labelmap"] = str(out / "labelmap.txt")

    want_coco, want_ls = "coco" in options.formats, "labelstudio" in options.formats
    done: list[Path] = []  # for the dataset-shaped exports
    root_url = options.image_root_url or default_root_url(options)
    recorded = stored_stems(out / "records", ".json")  # the manifest: one listing
    with ExitStack() as stack:

        def section(name: str, separator: str = ", ") -> _Section:
            return _Section(stack.enter_context(spool_file(out, name)), separator)

        coco_images, annotations = section("coco-images"), section("coco-annotations")
        tasks, gallery = section("labelstudio-tasks"), section("gallery", "\n")
        for relative in images:
            if stem_path(relative) not in recorded:
                continue
            rec_file = record_path(out, relative)
            record = json.loads(rec_file.read_text(encoding="utf-8"))
            done.append(relative)
            if options.preview:
                entry = {
                    "overlay": f"{stem_path(relative)}.jpg",
                    "file_name": record["file"],
                    "labels": record["labels_present"],
                }
                gallery.add(gallery_figure(entry, gallery.count))
            if not (want_coco or want_ls):
                continue
            pieces = load_pieces(options, relative, record)
            if want_coco:
                image_id = coco_images.count + 1
                entry = coco_image(image_id, record["file"], record["width"], record["height"])
                coco_images.add(_dumps(entry))
                for piece in pieces.coco or []:
                    ids = f'{{"id": {annotations.count + 1}, "image_id": {image_id}, '
                    annotations.add(ids + piece[1:])
            if want_ls:
                url = _dumps(image_url(root_url, record["file"]))
                tasks.add(f'{{"data": {{"image": {url}}}, "predictions": [{pieces.labelstudio}]}}')

        if want_coco:
            categories = [
                {"id": index, "name": name, "supercategory": ""}
                for index, name in enumerate(labels, start=1)
            ]
            with atomic_writer(out / "coco.json") as handle:
                handle.write(f'{{"info": {_dumps(COCO_INFO)}, "images": [')
                coco_images.copy_to(handle)
                handle.write('], "annotations": [')
                annotations.copy_to(handle)
                handle.write(f'], "categories": {_dumps(categories)}}}\n')
            outputs["coco"] = str(out / "coco.json")
        if want_ls:
            with atomic_writer(out / "labelstudio.json") as handle:
                handle.write("[")
                tasks.copy_to(handle)
                handle.write("]\n")
            outputs["labelstudio"] = str(out / "labelstudio.json")
        if "cvat-mask" in options.formats:
            outputs["cvat-mask"] = str(write_cvat_mask(out, labelmap_text(labels), done))
        if "hf" in options.formats:
            outputs.update(write_hf(out, options.images_dir, labels, done))
        if options.preview:
            with atomic_writer(out / "preview" / "index.html") as handle:
                handle.write(gallery_head(gallery.count))
                gallery.copy_to(handle)
                handle.write(gallery_tail())
            outputs["preview"] = str(out / "preview" / "index.html")
    return outputs
