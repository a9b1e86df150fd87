"""Exports of a ``pseudo-label`` run shaped as whole datasets: CVAT's "Segmentation mask 1.1"
zip and a Hugging Face ``datasets`` folder (with Parquet).

Both are assembled after the labelling from the files every done image already has, one image
at a time and without decoding anything: the mask PNG, the object PNG its writer stored for
CVAT (``objects/<rel>.png``) and the image file itself. Memory stays flat in the number of
images, a rerun (a resumed run) assembles them again from what is done, and each replaces the
previous one only when it is complete (:func:`~labeler.jobs.io.atomic_writer`,
:func:`~labeler.jobs.io.atomic_folder`).
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .extras import require_extra
from .io import (
    PNG_OPTIONS,
    TMP_FOLDER,
    atomic_folder,
    atomic_write_bytes,
    atomic_writer,
    image_bytes,
    read_json,
)
from .layout import mask_path, objects_path, record_path, stem_path, void_free_path
from .storage import Location, RemotePath

CVAT_ZIP = "cvat-mask.zip"
HF_FOLDER = "hf"
HF_PARQUET = "hf-parquet"
HF_SPLIT = "train"
HF_WRITER_BATCH = 16  # rows held before datasets writes them: bounds memory for large photos
HF_PARQUET_ROWS = 1000  # rows per Parquet file

# format -> (the module it needs, the extra that installs it)
FORMAT_EXTRAS = {"hf": ("datasets", "hf")}


def check_formats(formats: Iterable[str], out: Location) -> None:
    """Refuse at once, before anything is labelled, a format this run cannot write: one whose
    package is missing (:class:`~labeler.jobs.extras.MissingExtraError`, with the install
    command), or ``--format hf`` into object storage (``ValueError``: its two folders replace
    the old ones by a rename, :func:`~labeler.jobs.io.atomic_folder`, which object stores do
    not have)."""
    formats = set(formats)
    for name in sorted(formats & FORMAT_EXTRAS.keys()):
        module, extra = FORMAT_EXTRAS[name]
        require_extra(module, extra, f"--format {name}")
    if "hf" in formats and isinstance(out, RemotePath):
        raise ValueError(
            f"--format hf writes folders, which cannot be replaced atomically in object storage "
            f"({out}): write it to a local --out, or choose coco, labelstudio or cvat-mask"
        )


def write_cvat_files(
    out: Location, relative: Path, mask: np.ndarray, label_ids: Iterable[int] | None = None
) -> None:
    """Store the image's CVAT object PNG (:func:`exporters.cvat.object_mask`), and, only for a
    mask with void pixels, its class PNG with them as background. ``label_ids``: the mask's
    label ids (1..254) if known, else read from the mask."""
    from exporters import mask_to_png, present_ids
    from exporters.cvat import VOID, object_mask, object_png

    if label_ids is None:
        label_ids = [int(i) for i in present_ids(mask) if 0 < i < VOID]
    objects = object_png(object_mask(mask, label_ids))
    atomic_write_bytes(objects_path(out, relative), image_bytes(objects, "PNG", **PNG_OPTIONS))
    if (mask == VOID).any():
        classes = mask_to_png(np.where(mask == VOID, 0, mask).astype(np.uint8))
        data = image_bytes(classes, "PNG", **PNG_OPTIONS)
        atomic_write_bytes(void_free_path(out, relative), data)


def _cvat_files(out: Location, relative: Path) -> tuple[Location, Location]:
    """The image's class and object PNGs for the zip; made from its mask PNG when the run that
    labelled it did not ask for CVAT (a rerun that adds the format)."""
    path = objects_path(out, relative)
    if not path.exists():
        import io

        from PIL import Image

        from exporters import png_to_mask

        with Image.open(io.BytesIO(mask_path(out, relative).read_bytes())) as png:
            mask = png_to_mask(png)
        write_cvat_files(out, relative, mask)
    void_class = void_free_path(out, relative)
    return (void_class if void_class.exists() else mask_path(out, relative)), path


def write_cvat_mask(out: Location, labelmap: str, done: Sequence[Path]) -> Location:
    """``OUT/cvat-mask.zip`` from the done images (``done``: their paths under IMAGES_DIR,
    sorted), streamed entry by entry.

    Image names are the images' paths under IMAGES_DIR without their extension (``a/b`` for
    ``a/b.jpg``), as CVAT names frames of a task made from a folder tree.
    """
    from exporters.cvat import image_set_text

    target = out / CVAT_ZIP
    # Stored, not deflated: the PNGs are compressed already.
    with (
        atomic_writer(target, binary=True) as handle,
        zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive,
    ):
        archive.writestr("labelmap.txt", labelmap)
        names = []
        for relative in done:
            name = stem_path(relative).as_posix()
            names.append(name)
            classes, objects = _cvat_files(out, relative)
            for source, entry in ((classes, "SegmentationClass"), (objects, "SegmentationObject")):
                if isinstance(source, RemotePath):  # an object in storage: one PNG in memory
                    archive.writestr(f"{entry}/{name}.png", source.read_bytes())
                else:
                    archive.write(source, f"{entry}/{name}.png")
        archive.writestr("ImageSets/Segmentation/default.txt", image_set_text(names))
    return target


def _hf_rows(images_dir: Location, out: Path, done: Sequence[Path]) -> Iterable[dict[str, Any]]:
    for relative in done:
        record = read_json(record_path(out, relative))
        yield {
            "image": {"bytes": (images_dir / relative).read_bytes(), "path": record["file"]},
            "mask": {
                "bytes": mask_path(out, relative).read_bytes(),
                "path": f"{stem_path(relative)}.png",
            },
            "file_name": record["file"],
            "width": record["width"],
            "height": record["height"],
            "labels_present": record["labels_present"],
        }


def hf_features(labels: Sequence[str]) -> Any:
    """The columns of the Hugging Face dataset: ``image`` (the file's own bytes), ``mask`` (the
    indexed mask PNG: 0 background, k the k-th label, 255 ignore), ``file_name``, ``width``,
    ``height`` and ``labels_present``, whose ClassLabel names every mask id (0 background)."""
    import datasets

    names = datasets.ClassLabel(names=["background", *labels])
    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "file_name": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "labels_present": datasets.Sequence(names),
        }
    )


def write_hf(
    out: Path,
    images_dir: Location,
    labels: Sequence[str],
    done: Sequence[Path],
) -> dict[str, str]:
    """``OUT/hf`` (``DatasetDict.save_to_disk``, split ``train``) and ``OUT/hf-parquet``
    (``train-NNNNN-of-NNNNN.parquet``) from the done images, in sorted order.

    The rows are streamed into Arrow files by ``datasets`` (a few rows in memory at a time);
    ``datasets.load_from_disk(OUT/hf)`` and ``load_dataset("parquet", data_dir=...)`` read them,
    and the ClassLabel of ``labels_present`` carries the label names in both.
    """
    import datasets

    features = hf_features(labels)
    bars = datasets.is_progress_bar_enabled()  # the run has its own progress bar
    datasets.disable_progress_bars()
    with atomic_folder(out / HF_FOLDER) as folder, atomic_folder(out / HF_PARQUET) as parquet:
        cache = folder.parent / f".{HF_FOLDER}-cache{TMP_FOLDER}"
        try:
            if done:
                dataset = datasets.Dataset.from_generator(
                    _hf_rows,
                    features=features,
                    cache_dir=str(cache),
                    writer_batch_size=HF_WRITER_BATCH,
                    gen_kwargs={"images_dir": images_dir, "out": out, "done": list(done)},
                )
            else:
                dataset = datasets.Dataset.from_dict({k: [] for k in features}, features)
            datasets.DatasetDict({HF_SPLIT: dataset}).save_to_disk(str(folder))
            shards = max(1, -(-len(dataset) // HF_PARQUET_ROWS))
            for index in range(shards):
                shard = dataset.shard(shards, index, contiguous=True)
                target = parquet / f"{HF_SPLIT}-{index:05d}-of-{shards:05d}.parquet"
                shard.to_parquet(str(target), batch_size=HF_WRITER_BATCH)
            del dataset
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            if bars:
                datasets.enable_progress_bars()
    return {"hf": str(out / HF_FOLDER), "hf-parquet": str(out / HF_PARQUET)}
