"""Preview colours a person can trust: a label named after a colour is drawn in it, the others
in colours told apart from those; the legend sits beside the picture; mask PNGs keep VOC's."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from exporters import label_colours, mask_to_png, overlay, voc_palette
from exporters.preview import DISTINCT_COLOURS, colour_of_name
from labeler.jobs.writing import preview_bytes

ROOT = Path(__file__).resolve().parent.parent
DEMO_LABELS = (ROOT / "demo" / "scenes" / "colours.txt").read_text().split()


def _quadrants(side: int = 64) -> np.ndarray:
    """(side, side) ids 1..4, one label a quadrant."""
    mask = np.ones((side, side), np.uint8)
    half = side // 2
    mask[:half, half:], mask[half:, :half], mask[half:, half:] = 2, 3, 4
    return mask


def test_the_demo_labels_are_drawn_in_their_own_colours():
    assert DEMO_LABELS == ["red", "green", "blue", "yellow"]
    assert label_colours(DEMO_LABELS) == [(255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 0)]
    picture = overlay(Image.new("RGB", (64, 64)), _quadrants(), DEMO_LABELS, alpha=1.0)
    pixels = np.asarray(picture)
    assert tuple(pixels[10, 10]) == (255, 0, 0)  # "red" is red (VOC drew it maroon)
    assert tuple(pixels[10, 50]) == (0, 128, 0)
    assert tuple(pixels[50, 10]) == (0, 0, 255)  # "blue" is blue (VOC: olive)
    assert tuple(pixels[50, 50]) == (255, 255, 0)  # "yellow" is yellow (VOC: navy)


def test_colour_names_are_read_loosely_and_only_colour_names_count():
    assert colour_of_name("Light Blue") == colour_of_name("light-blue") == (173, 216, 230)
    assert colour_of_name("DARK_GREEN") == (0, 100, 0)
    assert colour_of_name("cat") is None and colour_of_name("red car") is None


def test_other_labels_get_distinct_colours_away_from_the_named_ones():
    labels = ["red", "cat", "dog", "person", "blue", "tree"]
    colours = label_colours(labels)
    assert colours[0] == (255, 0, 0) and colours[4] == (0, 0, 255)
    others = [colours[i] for i in (1, 2, 3, 5)]
    assert all(c in DISTINCT_COLOURS for c in others)
    assert len(set(colours)) == len(colours)
    for colour in others:  # none can be mistaken for "red" or "blue"
        for named in ((255, 0, 0), (0, 0, 255)):
            assert np.linalg.norm(np.subtract(colour, named)) >= 100
    many = label_colours([f"class {i}" for i in range(40)])  # past the palette: VOC's
    assert many[:20] == list(DISTINCT_COLOURS) and len(set(many)) == 40


def test_the_legend_is_beside_the_picture_never_over_it():
    image = Image.fromarray(np.full((48, 64, 3), 90, np.uint8))
    mask = _quadrants(64)[:48]
    bare = np.asarray(overlay(image, mask, DEMO_LABELS, legend=False))
    shown = np.asarray(overlay(image, mask, DEMO_LABELS))
    assert shown.shape[1] > 64 and shown.shape[0] >= 48
    np.testing.assert_array_equal(shown[:48, :64], bare)  # the top-left corner is the picture
    panel = shown[:, 64:].reshape(-1, 3)
    for colour in label_colours(DEMO_LABELS):  # one swatch per label present
        assert (panel == colour).all(axis=1).any(), colour
    tall = overlay(
        Image.new("RGB", (8, 8)),
        np.arange(1, 5, dtype=np.uint8).repeat(16).reshape(8, 8),
        DEMO_LABELS,
    )
    assert tall.height > 8  # a list longer than the picture: the canvas grows, nothing is cut


def test_the_written_preview_shows_the_named_colours_and_the_masks_keep_voc():
    mask = _quadrants(64)
    data = preview_bytes(Image.new("RGB", (64, 64), (128, 128, 128)), mask, DEMO_LABELS)
    with Image.open(io.BytesIO(data)) as jpeg:
        pixels = np.asarray(jpeg.convert("RGB")).astype(int)
    side = pixels.shape[0]  # enlarged to at least 256 px, legend on the right
    blue = pixels[side * 3 // 4, side // 4]  # the "blue" quadrant, half blue over grey
    assert blue[2] > blue[0] + 80 and blue[2] > blue[1] + 80, blue
    yellow = pixels[side * 3 // 4, side * 3 // 4]
    assert min(yellow[0], yellow[1]) > yellow[2] + 80, yellow
    png = mask_to_png(mask)
    assert png.getpalette()[: 3 * 5] == voc_palette(5)  # the mask file: VOC's colour map
