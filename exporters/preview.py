"""Overlays of masks on their images, and a static HTML gallery of those overlays."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from exporters.mask_ids import present_ids
from exporters.png import voc_palette
from labeler.result import IGNORE

BOUNDARY_COLOR = (255, 255, 255)
LEGEND_BACKGROUND = (32, 32, 32)
LEGEND_TEXT = (255, 255, 255)
_LEGEND_PAD = 4
_SWATCH_GAP = 4

DISTINCT_COLOURS = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip
"""The colours of labels that are not named after a colour, in order: twenty hues chosen to be
told apart from one another (and at half strength over a photo)."""
_NEAR = 100.0  # RGB distance under which a palette colour is taken as one a label already has


def colour_of_name(label: str) -> tuple[int, int, int] | None:
    """The colour a label is named after (a CSS colour name: ``red``, ``light blue``,
    ``Dark-Green``; case, spaces, hyphens and underscores do not matter), or None."""
    from PIL import ImageColor

    key = "".join(ch for ch in label.lower() if ch not in " -_")
    if key not in ImageColor.colormap:
        return None
    red, green, blue = ImageColor.getrgb(key)[:3]
    return red, green, blue


def label_colours(labels: Sequence[str]) -> list[tuple[int, int, int]]:
    """The preview colour of each label, in order (id k is ``labels[k - 1]``).

    A label named after a colour (:func:`colour_of_name`) is drawn in that colour, so the demo's
    "blue" is blue; every other label gets the next of :data:`DISTINCT_COLOURS` that is not
    close to one of those named colours, then the VOC palette's once those run out. The indexed
    PNG masks keep the VOC palette: there the palette is part of the file format (see
    :mod:`exporters.png`), here only what a person sees.
    """
    named = [colour_of_name(name) for name in labels]
    taken = [colour for colour in named if colour is not None]
    spare = iter(DISTINCT_COLOURS)
    palette = voc_palette()
    colours = []
    for index, colour in enumerate(named, start=1):
        if colour is None:
            colour = next(
                (c for c in spare if all(_distance(c, t) >= _NEAR for t in taken)),
                tuple(palette[3 * index : 3 * index + 3]),
            )
        colours.append(colour)
    return colours


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def _boundaries(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour holds a different id."""
    edges = np.zeros(mask.shape, dtype=bool)
    horizontal = mask[:, 1:] != mask[:, :-1]  # (H, W - 1)
    vertical = mask[1:, :] != mask[:-1, :]  # (H - 1, W)
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    edges[1:, :] |= vertical
    edges[:-1, :] |= vertical
    return edges


def _with_legend(
    image: Image.Image, entries: Sequence[tuple[str, tuple[int, int, int]]]
) -> Image.Image:
    """``image`` with a panel on its right listing ``(name, colour)`` with colour swatches: the
    legend never covers the picture. The canvas grows to the panel's width (and height, for a
    picture shorter than the list)."""
    if not entries:
        return image
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), name, font=font) for name, _ in entries]
    line_height = max(box[3] - box[1] for box in boxes) + 2
    text_width = max(box[2] - box[0] for box in boxes)
    swatch = line_height - 2
    width = 2 * _LEGEND_PAD + swatch + _SWATCH_GAP + text_width
    height = 2 * _LEGEND_PAD + line_height * len(entries)
    canvas = Image.new("RGB", (image.width + width, max(image.height, height)), LEGEND_BACKGROUND)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    left = image.width + _LEGEND_PAD
    for row, ((name, color), box) in enumerate(zip(entries, boxes, strict=True)):
        top = _LEGEND_PAD + row * line_height
        draw.rectangle((left, top, left + swatch, top + swatch), fill=color, outline=(255,) * 3)
        draw.text((left + swatch + _SWATCH_GAP, top - box[1]), name, font=font, fill=LEGEND_TEXT)
    return canvas


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    labels: Sequence[str],
    alpha: float = 0.5,
    *,
    boundaries: bool = True,
    legend: bool = True,
) -> Image.Image:
    """The RGB image with each label's colour (:func:`label_colours`) blended over its pixels.

    Background (0) pixels are left as they are; ignore (255) pixels get the VOC ignore colour.
    The blending is PIL's (``Image.blend``, in C).
    ``boundaries`` draws white lines where the id changes; ``legend`` adds a panel beside the
    picture (on its right: the result is wider) listing the labels present with their colours.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"overlay: mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.shape != (image.height, image.width):
        raise ValueError(
            f"overlay: mask shape {mask.shape} (H, W) does not match image size "
            f"{image.width}x{image.height} (W x H)"
        )
    names = list(labels)
    ids = present_ids(mask)
    bad = [int(i) for i in ids if (i < 0 or i > len(names)) and i != IGNORE]
    if bad:
        raise ValueError(f"overlay: mask ids {bad} are outside 0..{len(names)} and not 255")

    colours = label_colours(names)
    palette = voc_palette()  # 0 and 255 keep their VOC colours; 1..C are the labels'
    palette[3 : 3 + 3 * len(colours)] = [value for colour in colours for value in colour]
    ids_u8 = np.ascontiguousarray(mask, dtype=np.uint8)  # (H, W), ids fit 8 bits (checked)
    size = (image.width, image.height)
    base = image.convert("RGB")
    painted_colours = Image.frombytes("P", size, ids_u8.tobytes())
    painted_colours.putpalette(palette)
    blended = Image.blend(base, painted_colours.convert("RGB"), alpha)  # every pixel painted
    painted = Image.frombytes("L", size, np.where(ids_u8 != 0, 255, 0).astype(np.uint8).tobytes())
    result = Image.composite(blended, base, painted)  # background (0) left as it was
    if boundaries:
        edges = Image.frombytes("L", size, (_boundaries(ids_u8) * 255).astype(np.uint8).tobytes())
        result.paste(BOUNDARY_COLOR, (0, 0, *size), edges)
    if legend:
        present = [int(i) for i in ids if 1 <= i <= len(names)]
        result = _with_legend(result, [(names[i - 1], colours[i - 1]) for i in present])
    return result


STRIP_GAP = 4
STRIP_TITLES = ("image", "ground truth", "prediction")


def comparison_strip(
    rows: Sequence[tuple[Image.Image, np.ndarray, np.ndarray]],
    labels: Sequence[str],
    height: int = 160,
) -> Image.Image:
    """A picture of ``image | ground truth | prediction`` rows, one row per image.

    Args:
        rows: (RGB image, (H, W) ground-truth ids, (H, W) predicted ids) per image, the masks at
            the image's size, ids as in :func:`overlay` (0 background, k = ``labels[k - 1]``,
            255 ignore, shown in the VOC ignore colour).
        labels: the class names of the ids.
        height: every row is scaled to this height (masks nearest, images bilinear); a row
            whose legend is longer grows to hold it.

    Returns:
        One RGB image with a title line, rows separated by a gap of white; the overlays carry
        their legends beside them, so their columns are wider than the image column.
    """
    if not rows:
        raise ValueError("comparison_strip: no rows")
    if height < 8:
        raise ValueError(f"comparison_strip: height must be >= 8, got {height}")
    font = ImageFont.load_default()
    pictures = []
    for image, gt, pred in rows:
        width = max(1, round(image.width * height / image.height))
        size = (width, height)
        scaled = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        masks = [
            np.asarray(Image.fromarray(np.asarray(m, np.uint8)).resize(size, Image.NEAREST))
            for m in (gt, pred)
        ]
        pictures.append([scaled, *(overlay(scaled, m, labels) for m in masks)])
    title_height = 16
    widths = [max(picture[column].width for picture in pictures) for column in range(3)]
    lefts = [STRIP_GAP + sum(widths[:column]) + column * STRIP_GAP for column in range(3)]
    total_width = sum(widths) + 4 * STRIP_GAP
    heights = [max(part.height for part in picture) for picture in pictures]  # legends
    total_height = title_height + sum(heights) + len(pictures) * STRIP_GAP + STRIP_GAP
    strip = Image.new("RGB", (total_width, total_height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for left, title in zip(lefts, STRIP_TITLES, strict=True):
        draw.text((left, 2), title, font=font, fill=(0, 0, 0))
    top = title_height
    for picture, row_height in zip(pictures, heights, strict=True):
        for left, part in zip(lefts, picture, strict=True):
            strip.paste(part, (left, top))
        top += row_height + STRIP_GAP
    return strip


_GALLERY_STYLE = """
body { font-family: sans-serif; margin: 1em; background: #fafafa; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; }
figure { margin: 0; padding: 6px; background: #fff; border: 1px solid #ddd; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; word-break: break-all; margin-top: 4px; }
.labels { color: #555; }
"""


def _href(path: str) -> str:
    """A relative link, URL-quoted (separators kept) and escaped for an HTML attribute."""
    return html.escape(quote(str(path), safe="/"), quote=True)


def gallery_head(count: int, title: str = "StableSeg previews") -> str:
    """The start of :func:`gallery_html`'s page, up to its first figure, for ``count`` images.

    With :func:`gallery_figure` and :func:`gallery_tail` a gallery of any size is written
    piece by piece: ``head + "\\n".join(figures) + tail`` is :func:`gallery_html`'s page.
    """
    safe_title = html.escape(title)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{safe_title}</title>\n<style>{_GALLERY_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{safe_title}</h1>\n<p>{count} images</p>\n"
        '<div class="grid">\n'
    )


def gallery_figure(entry: Mapping[str, Any], index: int = 0) -> str:
    """One ``<figure>`` of the gallery (see :func:`gallery_html` for the entry's keys);
    ``index`` names the entry in an error message."""
    missing = [key for key in ("overlay", "file_name") if key not in entry]
    if missing:
        raise ValueError(f"gallery_html: entry {index} lacks {missing}: {dict(entry)!r}")
    labels = ", ".join(str(name) for name in entry.get("labels", [])) or "(none)"
    file_name = html.escape(str(entry["file_name"]))
    return (
        "<figure>"
        f'<a href="{_href(entry["overlay"])}">'
        f'<img src="{_href(entry.get("thumbnail", entry["overlay"]))}" alt="{file_name}"'
        ' loading="lazy"></a>'
        f"<figcaption>{file_name}<br>"
        f'<span class="labels">{html.escape(labels)}</span></figcaption>'
        "</figure>"
    )


def gallery_tail() -> str:
    """The end of :func:`gallery_html`'s page, after its last figure."""
    return "\n</div>\n</body>\n</html>\n"


def gallery_html(entries: Sequence[Mapping[str, Any]], title: str = "StableSeg previews") -> str:
    """A self-contained HTML page: a grid of overlay thumbnails with file names and labels.

    Each entry has ``overlay`` (path of the overlay image, relative to the page), ``file_name``
    (the source image's name, shown) and ``labels`` (the names present, shown); an optional
    ``thumbnail`` path is shown instead of the overlay itself. Every text is HTML-escaped.
    """
    figures = [gallery_figure(entry, index) for index, entry in enumerate(entries)]
    return gallery_head(len(figures), title) + "\n".join(figures) + gallery_tail()
