"""Label Studio brush and polygon predictions, and import files.

A brush result stores one label's pixels as Label Studio's RLE: the rle-pack bit stream of an
RGBA image of the mask, of which Label Studio draws the alpha channel; masks go in as 0/255 so the
alpha is opaque. ``exporters.brush_rle`` encodes it (byte for byte what
``label_studio_converter.brush.mask2rle`` writes, many times faster); ``label_studio_converter``
(imported when used) decodes it. A polygon result is one object's outline (see
:mod:`exporters.polygons`) in percent of the image's sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from exporters.brush_rle import brush_rle_bytes_by_label, encode_brush_rle
from exporters.mask_ids import present_ids
from labeler.result import IGNORE

if TYPE_CHECKING:
    from exporters.polygons import MaskObject

_RGBA_CHANNELS = 4


def _brush_api() -> Any:
    try:
        from label_studio_converter import brush
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Decoding Label Studio brushes needs label-studio-converter: "
            "pip install label-studio-converter"
        ) from error
    return brush


def _result_id(from_name: str, to_name: str, label_id: int, label: str) -> str:
    """A short id that stays the same for the same tag, label and position."""
    key = f"{from_name}\x00{to_name}\x00{label_id}\x00{label}".encode()
    return hashlib.sha1(key).hexdigest()[:10]


def mask_to_brush_rle(binary: np.ndarray) -> list[int]:
    """Label Studio brush RLE (list of byte values) of an (H, W) mask; nonzero pixels are in it."""
    binary = np.asarray(binary)
    if binary.ndim != 2:
        raise ValueError(f"mask_to_brush_rle: mask must be 2-D (H, W), got shape {binary.shape}")
    return encode_brush_rle(binary)


def _brush_results(
    mask: np.ndarray,
    labels: Sequence[str],
    scores: Mapping[str, float] | None,
    from_name: str,
    to_name: str,
    label_ids: Sequence[int] | None,
) -> list[dict[str, Any]]:
    """:func:`brush_results` with each RLE as a (N,) uint8 array."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"brush_results: mask must be 2-D (H, W), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"brush_results: mask must hold integer ids, got dtype {mask.dtype}")
    names = list(labels)
    if label_ids is None:
        ids = present_ids(mask)
        bad = [int(i) for i in ids if (i < 0 or i > len(names)) and i != IGNORE]
        if bad:
            raise ValueError(
                f"brush_results: mask ids {bad} are outside 0..{len(names)} "
                f"({len(names)} labels) and not {IGNORE} (ignore)"
            )
        label_ids = [int(i) for i in ids if 1 <= i <= len(names)]
    height, width = mask.shape
    present = [int(i) for i in label_ids]
    rles = brush_rle_bytes_by_label(mask, present)  # from the mask's runs, found once
    results = []
    for label_id in present:
        label = names[label_id - 1]
        result: dict[str, Any] = {
            "id": _result_id(from_name, to_name, label_id, label),
            "from_name": from_name,
            "to_name": to_name,
            "type": "brushlabels",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": rles[label_id],
                "brushlabels": [label],
            },
        }
        if scores is not None and label in scores:
            result["score"] = float(scores[label])
        results.append(result)
    return results


def brush_results(
    mask: np.ndarray,
    labels: Sequence[str],
    scores: Mapping[str, float] | None = None,
    from_name: str = "tag",
    to_name: str = "image",
    *,
    label_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Label Studio ``brushlabels`` results, one per label present in the mask, in label order.

    Args:
        mask: (H, W) integer ids; k = ``labels[k - 1]``; 0 (background) and 255 (ignore)
            produce no result.
        labels: the label names, as in the project's labeling config.
        scores: optional label -> confidence; a result carries ``score`` when its label has one.
        from_name: the ``name`` of the ``<BrushLabels>`` control tag.
        to_name: the ``name`` of the ``<Image>`` object tag.
        label_ids: the ids present, when the caller already knows them (validated against
            the mask by the caller); found from the mask otherwise.
    """
    results = _brush_results(mask, labels, scores, from_name, to_name, label_ids)
    for result in results:
        result["value"]["rle"] = result["value"]["rle"].tolist()
    return results


def _item_table() -> np.ndarray:
    """(256, 5) uint8: the JSON list item of each byte value, ``"v, "``, padded with zeros."""
    table = np.zeros((256, 5), dtype=np.uint8)
    for value in range(256):
        text = f"{value}, ".encode("ascii")
        table[value, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    return table


_LIST_ITEMS = _item_table()


def byte_list_json(values: np.ndarray) -> str:
    """``json.dumps(values.tolist())`` of a 1-D uint8 array, rendered with numpy.

    A brush RLE is hundreds of thousands of bytes at 12 MP; ``json`` writes them a few times
    slower than one table lookup and one compaction of the padding.
    """
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype != np.uint8:
        raise ValueError(
            f"byte_list_json: values must be 1-D uint8, got shape {values.shape} "
            f"and dtype {values.dtype}"
        )
    padded = _LIST_ITEMS[values].reshape(-1)  # (5 N,) items and zero padding
    text = padded[padded != 0][:-2]  # without the padding and the last ", "
    return "[" + text.tobytes().decode("ascii") + "]"


def brush_prediction_json(
    mask: np.ndarray,
    labels: Sequence[str],
    scores: Mapping[str, float],
    model_version: str,
    from_name: str = "tag",
    to_name: str = "image",
    *,
    label_ids: Sequence[int] | None = None,
    counts: np.ndarray | None = None,
) -> str:
    """The JSON text of :func:`brush_prediction` of the mask.

    Equal to ``json.dumps(brush_prediction(...), ensure_ascii=False)``, written faster: the
    RLE byte lists, most of the text, are rendered by :func:`byte_list_json`.

    Args:
        label_ids: the label ids present, when the caller knows them (see
            :func:`brush_results`).
        counts: the pixels of each id (:func:`exporters.id_counts` of the mask), when the
            caller has them: the task score needs them.
    """
    results = _brush_results(mask, labels, scores, from_name, to_name, label_ids)
    texts = []
    for result in results:
        rle = result["value"]["rle"]
        result["value"]["rle"] = []
        text = json.dumps(result, ensure_ascii=False)
        # '"rle": []' occurs once: quotes inside string values are escaped.
        texts.append(text.replace('"rle": []', f'"rle": {byte_list_json(rle)}', 1))
    if counts is None:
        counts = np.bincount(np.asarray(mask).ravel(), minlength=len(labels) + 1)
    score = _score_of_areas(counts, labels, scores)
    return (
        f'{{"model_version": {json.dumps(str(model_version), ensure_ascii=False)}, '
        f'"score": {json.dumps(score)}, "result": [{", ".join(texts)}]}}'
    )


def decode_brush_result(result: Mapping[str, Any]) -> np.ndarray:
    """The (H, W) boolean mask of one brush result (its alpha channel, opaque = True)."""
    try:
        rle = result["value"]["rle"]
        width, height = int(result["original_width"]), int(result["original_height"])
    except (KeyError, TypeError) as error:
        raise ValueError(
            "decode_brush_result: expected a result with value.rle, original_width and "
            f"original_height; missing {error}"
        ) from error
    rgba = _brush_api().decode_rle(rle)  # (H * W * 4,) uint8
    if rgba.size != height * width * _RGBA_CHANNELS:
        raise ValueError(
            f"decode_brush_result: RLE holds {rgba.size} values, expected "
            f"{height}x{width}x{_RGBA_CHANNELS} = {height * width * _RGBA_CHANNELS}"
        )
    alpha = rgba.reshape(height, width, _RGBA_CHANNELS)[:, :, 3]  # (H, W)
    return alpha > 127


def prediction(
    results: Sequence[Mapping[str, Any]], model_version: str, score: float | None = None
) -> dict[str, Any]:
    """A Label Studio prediction; ``score`` defaults to the mean of the results' scores."""
    if score is None:
        result_scores = [float(r["score"]) for r in results if "score" in r]
        score = float(np.mean(result_scores)) if result_scores else 0.0
    return {"model_version": str(model_version), "score": float(score), "result": list(results)}


def task_score(mask: np.ndarray, labels: Sequence[str], scores: Mapping[str, float]) -> float:
    """The confidence of a whole mask: the pixel-weighted mean of its labels' scores.

    A label's score is the mean probability over the pixels it wins, so this is the mean, over
    every painted pixel, of the probability of the label it was given: the share of the painted
    pixels the model expects to be right. A plain mean over the labels would let a speck of a
    few pixels weigh as much as the main object. Background (0) and ignore (255) pixels are not
    painted and do not count; a mask with nothing painted scores 0.0, so such tasks sort first
    in a review ordered by score.

    Args:
        mask: (H, W) integer ids, k = ``labels[k - 1]``.
        labels: the label names.
        scores: label -> confidence; a label without a score counts as 0.
    """
    counts = np.bincount(np.asarray(mask).ravel(), minlength=len(labels) + 1)  # (max id + 1,)
    return _score_of_areas(counts, labels, scores)


def _score_of_areas(
    counts: np.ndarray, labels: Sequence[str], scores: Mapping[str, float]
) -> float:
    """:func:`task_score` from the pixel count of each id ((at least L + 1,) array)."""
    areas = np.zeros(len(labels), dtype=np.float64)  # (L,) pixels per label
    known = np.asarray(counts[1 : len(labels) + 1], dtype=np.float64)
    areas[: known.size] = known
    painted = float(areas.sum())
    if painted == 0:
        return 0.0
    per_label = np.array([float(scores.get(name, 0.0)) for name in labels], dtype=np.float64)
    return float((areas * per_label).sum() / painted)


def brush_prediction(
    mask: np.ndarray,
    labels: Sequence[str],
    scores: Mapping[str, float],
    model_version: str,
    from_name: str = "tag",
    to_name: str = "image",
) -> dict[str, Any]:
    """The Label Studio prediction of an id mask: its brush results and :func:`task_score`."""
    results = brush_results(mask, labels, scores, from_name, to_name)
    return prediction(results, model_version, score=task_score(mask, labels, scores))


def import_task(
    image_url: str, prediction: Mapping[str, Any] | None = None, data_key: str = "image"
) -> dict[str, Any]:
    """One task of an import file: ``{"data": {data_key: url}, "predictions": [prediction]}``.

    ``data_key`` is the ``$variable`` the ``<Image value="$image">`` tag reads.
    """
    if not image_url:
        raise ValueError("import_task: image_url must not be empty")
    task: dict[str, Any] = {"data": {data_key: image_url}}
    task["predictions"] = [dict(prediction)] if prediction is not None else []
    return task


def build_import_file(tasks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The JSON list Label Studio imports (Import > upload a .json), one task per image."""
    checked = []
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping) or not isinstance(task.get("data"), Mapping):
            raise ValueError(f"build_import_file: task {index} has no 'data' dict: {task!r}")
        checked.append(dict(task))
    return checked


def image_url(root_url: str, relative_path: str | PurePosixPath) -> str:
    """Join a root URL and a relative posix path, URL-quoting each path segment.

    ``root_url`` is where Label Studio finds the images: a local-files root such as
    ``/data/local-files/?d=images`` or a web folder such as ``http://host/imgs/``.
    ``image_url("/data/local-files/?d=images", "a b/c#1.jpg")`` gives
    ``/data/local-files/?d=images/a%20b/c%231.jpg``.
    """
    if not root_url:
        raise ValueError("image_url: root_url must not be empty")
    path = str(relative_path)
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts:
        raise ValueError(
            f"image_url: relative_path must be a relative path without '..', got "
            f"{str(relative_path)!r}"
        )
    quoted = "/".join(quote(part, safe="") for part in parts)
    if root_url.endswith(("/", "=")):
        return root_url + quoted
    return f"{root_url}/{quoted}"


PERCENT_DIGITS = 4  # decimals of the polygon points' percent coordinates


def polygon_results(
    objects: Sequence[MaskObject],
    labels: Sequence[str],
    width: int,
    height: int,
    scores: Mapping[str, float] | None = None,
    from_name: str = "tag",
    to_name: str = "image",
) -> list[dict[str, Any]]:
    """Label Studio ``polygonlabels`` results, one region per object (see
    :mod:`exporters.polygons`), points in percent of the image's width and height.

    A Label Studio polygon has no holes: an object with holes is one ring with its holes joined
    by zero-width cuts (:func:`exporters.polygons.joined_ring`), which Label Studio fills with
    the holes empty.

    Args:
        objects: the image's objects; ``labels[obj.label_id - 1]`` names each.
        labels: the label names, as in the project's labeling config.
        width, height: the image's size in pixels.
        scores: optional label -> confidence; a result carries its label's score.
        from_name: the ``name`` of the ``<PolygonLabels>`` control tag.
        to_name: the ``name`` of the ``<Image>`` object tag.
    """
    from exporters.polygons import joined_ring

    if width <= 0 or height <= 0:
        raise ValueError(
            f"polygon_results: width and height must be positive, got {width}x{height}"
        )
    scale = np.array([100.0 / width, 100.0 / height])
    results = []
    for index, obj in enumerate(objects):
        label = labels[obj.label_id - 1]
        points = np.round(np.clip(joined_ring(obj) * scale, 0.0, 100.0), PERCENT_DIGITS)
        result: dict[str, Any] = {
            "id": _result_id(from_name, to_name, index, label),
            "from_name": from_name,
            "to_name": to_name,
            "type": "polygonlabels",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {"points": points.tolist(), "closed": True, "polygonlabels": [label]},
        }
        if scores is not None and label in scores:
            result["score"] = float(scores[label])
        results.append(result)
    return results


def polygon_prediction(
    mask: np.ndarray,
    objects: Sequence[MaskObject],
    labels: Sequence[str],
    scores: Mapping[str, float],
    model_version: str,
    from_name: str = "tag",
    to_name: str = "image",
    *,
    counts: np.ndarray | None = None,
) -> dict[str, Any]:
    """The Label Studio prediction of an id mask as polygons: :func:`polygon_results` of its
    objects and the mask's :func:`task_score`.

    Args:
        counts: the pixels of each id (:func:`exporters.id_counts` of the mask), if known.
    """
    height, width = np.asarray(mask).shape
    results = polygon_results(objects, labels, width, height, scores, from_name, to_name)
    if counts is None:
        counts = np.bincount(np.asarray(mask).ravel(), minlength=len(labels) + 1)
    return prediction(results, model_version, score=_score_of_areas(counts, labels, scores))


def decode_polygon_result(result: Mapping[str, Any]) -> np.ndarray:
    """The (H, W) boolean mask of one polygon result: the pixels whose centres the polygon
    holds (non-zero winding, so a hole joined by a cut and run the other way stays empty)."""
    from matplotlib.path import Path as Outline

    try:
        points = np.asarray(result["value"]["points"], dtype=np.float64).reshape(-1, 2)
        width, height = int(result["original_width"]), int(result["original_height"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            "decode_polygon_result: expected a result with value.points ([[x, y], ...] in "
            f"percent), original_width and original_height; got {error}"
        ) from error
    vertices = points * np.array([width / 100.0, height / 100.0])  # (N, 2) pixel edges
    rows, cols = np.mgrid[0:height, 0:width]  # (H, W) each
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)  # (H * W, 2)
    return Outline(vertices).contains_points(centres).reshape(height, width)
