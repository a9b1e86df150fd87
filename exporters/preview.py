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
LEGEND_BACKGROUND = (0, 0, 0, 170)
LEGEND_TEXT = (255, 255, 255, 255)
_LEGEND_PAD = 4
_SWATCH_GAP = 4


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


def _draw_legend(image: Image.Image, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    """Draw a box in the top-left corner listing ``(name, colour)`` with colour swatches.

    Only the box's region of the image is composited.
    """
    if not entries:
        return
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    boxes = [measure.textbbox((0, 0), name, font=font) for name, _ in entries]
    line_height = max(box[3] - box[1] for box in boxes) + 2
    text_width = max(box[2] - box[0] for box in boxes)
    swatch = line_height - 2
    width = 2 * _LEGEND_PAD + swatch + _SWATCH_GAP + text_width
    height = 2 * _LEGEND_PAD + line_height * len(entries)
    region = (0, 0, min(image.width, width + 1), min(image.height, height + 1))
    overlay = Image.new("RGBA", region[2:], (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, 0, width, height), fill=LEGEND_BACKGROUND)
    for row, ((name, color), box) in enumerate(zip(entries, boxes, strict=True)):
        top = _LEGEND_PAD + row * line_height
        draw.rectangle(
            (_LEGEND_PAD, top, _LEGEND_PAD + swatch, top + swatch),
            fill=(*color, 255),
            outline=(255, 255, 255, 255),
        )
        text_x = _LEGEND_PAD + swatch + _SWATCH_GAP
        draw.text((text_x, top - box[1]), name, font=font, fill=LEGEND_TEXT)
    corner = image.crop(region).convert("RGBA")
    image.paste(Image.alpha_composite(corner, overlay).convert("RGB"), region[:2])


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    labels: Sequence[str],
    alpha: float = 0.5,
    *,
    boundaries: bool = True,
    legend: bool = True,
) -> Image.Image:
    """The RGB image with each label's VOC colour blended over its pixels.

    Background (0) pixels are left as they are; ignore (255) pixels get the VOC ignore colour.
    The blending is PIL's (``Image.blend``, in C).
    ``boundaries`` draws white lines where the id changes, ``legend`` adds a box listing the
    labels present with their colours.
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

    palette = voc_palette()
    ids_u8 = np.ascontiguousarray(mask, dtype=np.uint8)  # (H, W), ids fit 8 bits (checked)
    size = (image.width, image.height)
    base = image.convert("RGB")
    colors = Image.frombytes("P", size, ids_u8.tobytes())
    colors.putpalette(palette)
    blended = Image.blend(base, colors.convert("RGB"), alpha)  # every pixel painted
    painted = Image.frombytes("L", size, np.where(ids_u8 != 0, 255, 0).astype(np.uint8).tobytes())
    result = Image.composite(blended, base, painted)  # background (0) left as it was
    if boundaries:
        edges = Image.frombytes("L", size, (_boundaries(ids_u8) * 255).astype(np.uint8).tobytes())
        result.paste(BOUNDARY_COLOR, (0, 0, *size), edges)
    if legend:
        present = [int(i) for i in ids if 1 <= i <= len(names)]
        entries = [(names[i - 1], tuple(palette[3 * i : 3 * i + 3])) for i in present]
        _draw_legend(result, entries)
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
        height: every row is scaled to this height (masks nearest, images bilinear).

    Returns:
        One RGB image with a title line, rows separated by a gap of white.
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
    column_width = max(picture[0].width for picture in pictures)
    total_width = 3 * column_width + 4 * STRIP_GAP
    total_height = title_height + len(pictures) * (height + STRIP_GAP) + STRIP_GAP
    strip = Image.new("RGB", (total_width, total_height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for column, title in enumerate(STRIP_TITLES):
        left = STRIP_GAP + column * (column_width + STRIP_GAP)
        draw.text((left, 2), title, font=font, fill=(0, 0, 0))
    for row, picture in enumerate(pictures):
        top = title_height + row * (height + STRIP_GAP)
        for column, part in enumerate(picture):
            strip.paste(part, (STRIP_GAP + column * (column_width + STRIP_GAP), top))
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
