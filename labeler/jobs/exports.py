"""Streamed exports of a ``pseudo-label`` run: per-image pieces, assembled in constant memory.

When an image is done, its writer stores ``pieces/<rel>.jsonl`` next to its mask: the lines of
each format asked for (:data:`PIECE_FORMATS`), already serialised, only the ids missing:

    {"size": [H, W], "coco": 2, "labelstudio": 1, "coco-polygons": null, ...,
     "polygons": null}                               header: how many lines of each format
    {"category_id": 1, "segmentation": ..., "area": ..., "bbox": ..., "iscrowd": 0, "score": ...}
    {"category_id": 3, ...}
    {"model_version": ..., "score": ..., "result": [...brush results...]}

A count of null means "not made" (that format was not asked for by the run that wrote it);
``polygons`` holds the ``--min-area`` and ``--polygon-tolerance`` the polygon formats' lines
(COCO polygon annotations, a Label Studio polygon prediction, YOLO label lines) were made with.

:func:`assemble_exports` walks the images in sorted order and streams ``coco.json``,
``coco-polygons.json``, ``labelstudio.json``, ``labelstudio-polygons.json`` and
``preview/index.html`` into temporary files, numbering images and annotations as it goes (the
same ids as building the whole document in memory), then renames them, and writes each image's
YOLO label file: memory stays constant whatever the number of images, and no mask is decoded
again. An image whose pieces are missing (a run made by an older version), lack a format asked
for now, or were made with other polygon settings has them made from its mask PNG, once, and
stored.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .dataset_exports import write_cvat_mask, write_hf
from .io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    spool_file,
    stored_stems,
)
from .layout import YOLO_DIR, mask_path, pieces_path, record_path, stem_path
from .pipeline import StageClock, ordered_map
from .pseudo_label_options import POLYGON_FORMATS, PseudoLabelOptions
from .storage import RemotePath

COCO_INFO = {"description": "StableSeg pseudo-labels"}
_COPY_BUFFER = 1 << 20
REMOTE_READERS = 16
"""Threads that read the done images' records and pieces for the assembly when OUT_DIR is in
object storage, at least: each read is a request whose time is mostly waiting."""


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


PIECE_FORMATS = ("coco", "labelstudio", "coco-polygons", "labelstudio-polygons", "yolo-seg")
"""The formats stored as pieces, in the order of their lines in a pieces file."""


@dataclass(frozen=True)
class Pieces:
    """One image's export pieces, as serialised texts: each format's lines (None: not made),
    and the polygon settings (``PseudoLabelOptions.polygon_settings``) its polygon formats
    were made with."""

    size: tuple[int, int]  # (H, W) of the mask
    parts: Mapping[str, list[str] | None]
    polygons: Mapping[str, Any] | None = None

    def lines(self, fmt: str) -> list[str]:
        """The lines of one format (none when it was not made)."""
        return list(self.parts.get(fmt) or [])

    def has(self, formats: Iterable[str], polygons: Mapping[str, Any] | None = None) -> bool:
        """Whether every export in ``formats`` can be assembled from these pieces, the polygon
        formats made with ``polygons``."""
        wanted = [fmt for fmt in formats if fmt in PIECE_FORMATS]
        if any(self.parts.get(fmt) is None for fmt in wanted):
            return False
        made_of_objects = any(fmt in POLYGON_FORMATS for fmt in wanted)
        return not made_of_objects or dict(self.polygons or {}) == dict(polygons or {})

    def text(self) -> str:
        """The pieces file's content."""
        header: dict[str, Any] = {"size": list(self.size)}
        for fmt in PIECE_FORMATS:
            made = self.parts.get(fmt)
            header[fmt] = None if made is None else len(made)
        header["polygons"] = None if self.polygons is None else dict(self.polygons)
        lines = [_dumps(header), *(line for fmt in PIECE_FORMATS for line in self.lines(fmt))]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Pieces:
        lines = text.splitlines()
        header = json.loads(lines[0])
        parts: dict[str, list[str] | None] = {}
        at = 1
        for fmt in PIECE_FORMATS:
            count = header.get(fmt)
            parts[fmt] = None if count is None else lines[at : at + count]
            at += count or 0
        if len(lines) != at:
            raise ValueError(f"pieces file has {len(lines)} lines, its header says {header}")
        return cls(tuple(header["size"]), parts, header.get("polygons"))


def make_pieces(
    mask: np.ndarray,
    label_ids: Sequence[int],
    labels: Sequence[str],
    scores: Mapping[str, float],
    model_version: str,
    formats: Iterable[str],
    clock: StageClock | None = None,
    counts: np.ndarray | None = None,
    polygons: Mapping[str, Any] | None = None,
) -> Pieces:
    """The export pieces of one image's mask.

    Args:
        mask: (H, W) ids (0 background, k = ``labels[k - 1]``, 255 ignore).
        label_ids: the label ids present in ``mask`` (1-based, sorted), already validated.
        labels: every label of the run.
        scores: label -> score as the record stores it (rounded): COCO annotations and Label
            Studio results carry the score of their label, as when built from the record.
        model_version: the prediction's model version.
        formats: the exports asked for (those of :data:`PIECE_FORMATS`; others are ignored).
        clock: adds the CPU time of each format's pieces to its stage.
        counts: the pixels of each id of ``mask`` (:func:`exporters.id_counts`), if known.
        polygons: ``min_area`` and ``tolerance`` of the objects of the polygon formats
            (``PseudoLabelOptions.polygon_settings``; the exporters' defaults when None).
    """
    from exporters import (
        brush_prediction_json,
        mask_annotations,
        mask_objects,
        polygon_annotations,
        polygon_prediction,
        yolo_lines,
    )

    formats = set(formats)
    parts: dict[str, list[str] | None] = dict.fromkeys(PIECE_FORMATS)
    clock = clock or StageClock()
    per_label = [float(scores.get(name, 0.0)) for name in labels]
    height, width = (int(side) for side in mask.shape)
    if counts is None:
        from exporters import id_counts

        counts = id_counts(mask)
    if "coco" in formats:
        with clock.measure("coco"):
            annotations = mask_annotations(mask, len(labels), scores=per_label, label_ids=label_ids)
            parts["coco"] = [_dumps(annotation) for annotation in annotations]
    if "labelstudio" in formats:
        with clock.measure("labelstudio"):
            parts["labelstudio"] = [
                brush_prediction_json(
                    mask, labels, scores, model_version, label_ids=label_ids, counts=counts
                )
            ]
    made_of_objects = formats & set(POLYGON_FORMATS)
    if made_of_objects:
        with clock.measure("polygons"):
            shape = dict(polygons or {})
            objects = mask_objects(mask, label_ids, **shape)
    else:
        shape, objects = None, []
    if "coco-polygons" in formats:
        with clock.measure("coco-polygons"):
            annotations = polygon_annotations(mask, objects, scores=per_label)
            parts["coco-polygons"] = [_dumps(annotation) for annotation in annotations]
    if "labelstudio-polygons" in formats:
        with clock.measure("labelstudio-polygons"):
            found = polygon_prediction(mask, objects, labels, scores, model_version, counts=counts)
            parts["labelstudio-polygons"] = [_dumps(found)]
    if "yolo-seg" in formats:
        with clock.measure("yolo-seg"):
            parts["yolo-seg"] = yolo_lines(objects, width, height)
    return Pieces((height, width), parts, shape)


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
        polygons=options.polygon_settings(),
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
    if pieces is None or not pieces.has(options.formats, options.polygon_settings()):
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


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s file: a hard link where the filesystem allows, a copy
    elsewhere; through a temporary name, so a kill leaves no half-copied image."""
    import os
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_done(
    options: PseudoLabelOptions, relative: Path, wanted: Sequence[str]
) -> tuple[dict[str, Any], Pieces | None]:
    """A done image's record and, when a piece format is ``wanted``, its pieces; its YOLO files
    are written here (order does not matter to them). Run by the assembly's reader threads."""
    record = json.loads(record_path(options.out_dir, relative).read_text(encoding="utf-8"))
    if not wanted:
        return record, None
    pieces = load_pieces(options, relative, record)
    if "yolo-seg" in wanted:
        _write_yolo_image(options, relative, pieces.lines("yolo-seg"))
    return record, pieces


def _write_yolo_image(options: PseudoLabelOptions, relative: Path, lines: list[str]) -> None:
    """An image's label file in ``OUT_DIR/yolo/labels/`` (rewritten only when it changed) and
    the image in ``OUT_DIR/yolo/images/`` (linked or copied once)."""
    root = options.out_dir / YOLO_DIR
    label_file = root / "labels" / f"{stem_path(relative)}.txt"
    text = "".join(f"{line}\n" for line in lines)
    if not label_file.exists() or label_file.read_text(encoding="utf-8") != text:
        atomic_write_text(label_file, text)
    image = root / "images" / relative
    if not image.exists():
        source = options.images_dir / relative
        if isinstance(source, RemotePath) or isinstance(image, RemotePath):
            atomic_write_bytes(image, source.read_bytes())  # in object storage: one upload
        else:
            _link_or_copy(source, image)


def _write_coco(path: Path, images: _Section, annotations: _Section, labels: Sequence[str]) -> None:
    """A COCO file from its spooled ``images`` and ``annotations`` arrays."""
    categories = [
        {"id": index, "name": name, "supercategory": ""}
        for index, name in enumerate(labels, start=1)
    ]
    with atomic_writer(path) as handle:
        handle.write(f'{{"info": {_dumps(COCO_INFO)}, "images": [')
        images.copy_to(handle)
        handle.write('], "annotations": [')
        annotations.copy_to(handle)
        handle.write(f'], "categories": {_dumps(categories)}}}\n')


def _write_list(path: Path, items: _Section) -> None:
    with atomic_writer(path) as handle:
        handle.write("[")
        items.copy_to(handle)
        handle.write("]\n")


def assemble_exports(options: PseudoLabelOptions, images: Sequence[Path]) -> dict[str, str]:
    """Stream every export of the done ``images`` (sorted order). Returns the output paths.

    The result is byte for byte what ``json.dumps`` of the whole COCO dataset, of the whole
    import file and :func:`exporters.gallery_html` of every entry would write: image ids count
    the done images from 1 in sorted order, annotation ids count their annotations from 1.
    ``coco-polygons.json`` and ``labelstudio-polygons.json`` are numbered the same way; the
    YOLO folder gets each image's label file and image as it comes, and ``data.yaml`` last.
    """
    from exporters import (
        classes_json,
        coco_image,
        gallery_figure,
        gallery_head,
        gallery_tail,
        image_url,
        labelmap_text,
        yolo_data_yaml,
    )

    out, labels = options.out_dir, options.labels
    outputs = {"masks": str(out / "masks")}
    atomic_write_text(out / "labelmap.txt", labelmap_text(labels))
    atomic_write_json(out / "classes.json", classes_json(labels), indent=2)
    outputs["labelmap"] = str(out / "labelmap.txt")

    wanted = [fmt for fmt in PIECE_FORMATS if fmt in options.formats]
    cocos = [fmt for fmt in ("coco", "coco-polygons") if fmt in wanted]
    studios = [fmt for fmt in ("labelstudio", "labelstudio-polygons") if fmt in wanted]
    done: list[Path] = []  # for the dataset-shaped exports
    root_url = options.image_root_url or default_root_url(options)
    recorded = stored_stems(out / "records", ".json")  # the manifest: one listing
    with ExitStack() as stack:

        def section(name: str, separator: str = ", ") -> _Section:
            return _Section(stack.enter_context(spool_file(out, name)), separator)

        coco_images = {fmt: section(f"{fmt}-images") for fmt in cocos}
        coco_annotations = {fmt: section(f"{fmt}-annotations") for fmt in cocos}
        tasks = {fmt: section(f"{fmt}-tasks") for fmt in studios}
        gallery = section("gallery", "\n")
        todo = [relative for relative in images if stem_path(relative) in recorded]
        readers = options.thread_count()
        if isinstance(out, RemotePath):
            readers = max(readers, REMOTE_READERS)
        read = stack.enter_context(
            contextlib.closing(
                ordered_map(
                    lambda relative: _read_done(options, relative, wanted),
                    todo,
                    readers,
                    2 * readers,
                )
            )
        )
        for relative, (record, pieces) in zip(todo, read, strict=True):
            done.append(relative)
            if options.preview:
                entry = {
                    "overlay": f"{stem_path(relative)}.jpg",
                    "file_name": record["file"],
                    "labels": record["labels_present"],
                }
                gallery.add(gallery_figure(entry, gallery.count))
            if pieces is None:
                continue
            for fmt in cocos:
                image_id = coco_images[fmt].count + 1
                entry = coco_image(image_id, record["file"], record["width"], record["height"])
                coco_images[fmt].add(_dumps(entry))
                for piece in pieces.lines(fmt):
                    ids = f'{{"id": {coco_annotations[fmt].count + 1}, "image_id": {image_id}, '
                    coco_annotations[fmt].add(ids + piece[1:])
            for fmt in studios:
                url = _dumps(image_url(root_url, record["file"]))
                (found,) = pieces.lines(fmt)
                tasks[fmt].add(f'{{"data": {{"image": {url}}}, "predictions": [{found}]}}')

        for fmt in cocos:
            _write_coco(out / f"{fmt}.json", coco_images[fmt], coco_annotations[fmt], labels)
            outputs[fmt] = str(out / f"{fmt}.json")
        for fmt in studios:
            _write_list(out / f"{fmt}.json", tasks[fmt])
            outputs[fmt] = str(out / f"{fmt}.json")
        if "yolo-seg" in wanted:
            atomic_write_text(out / YOLO_DIR / "data.yaml", yolo_data_yaml(labels))
            outputs["yolo-seg"] = str(out / YOLO_DIR / "data.yaml")
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
