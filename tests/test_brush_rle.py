"""Our brush RLE encoder against label_studio_converter's, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_converter import brush

from exporters import brush_rle, mask_to_brush_rle
from exporters.brush_rle import (
    brush_rle_bytes,
    brush_rle_bytes_by_label,
    encode_brush_rle,
    encode_brush_rles,
    rle_pack_bytes,
)
from labeler.result import BACKGROUND, IGNORE, MAX_LABELS

# Run lengths, in values, where the format changes: the last length of each run-length field
# (8, 16, 256, 65,536) and of one, two and three 16-bit pieces.
FIELD_EDGES = (1, 2, 8, 9, 16, 17, 256, 257, 65_536, 65_537, 131_072, 131_073, 196_609)


def reference(binary: np.ndarray) -> list[int]:
    """label_studio_converter's encoding of a mask, fed as 0/255 the way Label Studio draws it."""
    alpha = np.asarray(binary, dtype=bool).astype(np.uint8) * np.uint8(255)
    return [int(v) for v in brush.mask2rle(alpha)]


def assert_same(binary: np.ndarray) -> None:
    ours = encode_brush_rle(binary)
    assert all(type(v) is int for v in ours)
    expected = reference(binary)
    assert len(ours) == len(expected), f"{len(ours)} bytes, reference {len(expected)}"
    if ours != expected:
        first = next(i for i, (a, b) in enumerate(zip(ours, expected)) if a != b)
        raise AssertionError(f"first differing byte {first}: {ours[first]} != {expected[first]}")


def runs_row(pixel_runs: list[int], first: bool = False) -> np.ndarray:
    """A (1, N) mask of alternating runs of the given pixel lengths, the first ``first``."""
    values = [(i % 2 == 0) == first for i in range(len(pixel_runs))]
    return np.repeat(values, pixel_runs)[None, :]


def blob(height: int, width: int) -> np.ndarray:
    """An (H, W) ellipse off centre: a few runs a row, like a real segment."""
    rows, cols = np.ogrid[:height, :width]
    return ((rows - 0.4 * height) / (0.3 * height)) ** 2 + (
        (cols - 0.6 * width) / (0.35 * width)
    ) ** 2 < 1


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (17, 1), (7, 13), (64, 64), (513, 511)])
@pytest.mark.parametrize("fill", [False, True])
def test_empty_and_full(shape, fill) -> None:
    assert_same(np.full(shape, fill))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 13), (513, 511)])
def test_one_pixel_at_corners_and_middle(shape) -> None:
    height, width = shape
    spots = {(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)}
    spots.add((height // 2, width // 2))
    for row, col in sorted(spots):
        mask = np.zeros(shape, dtype=bool)
        mask[row, col] = True
        assert_same(mask)
        assert_same(~mask)


@pytest.mark.parametrize("first", [False, True])
def test_runs_on_every_field_edge(first) -> None:
    # RGBA: a run of p pixels is a run of 4p values; the edges in pixels, with a pixel more and
    # less, and very long runs that need many 16-bit pieces (the last one short).
    edges = sorted({max(1, e // 4 + d) for e in FIELD_EDGES for d in (-1, 0, 1)})
    for length in edges:
        assert_same(runs_row([length], first))
        assert_same(runs_row([3, length, 5], first))
    assert_same(runs_row(edges, first))
    assert_same(runs_row(edges[::-1], first))
    assert_same(runs_row([1, 1_000_003, 2, 16_385 * 3], first))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (7, 13), (1, 101), (64, 65)])
def test_alternating_pixels(shape) -> None:
    rows, cols = np.indices(shape)
    assert_same((rows + cols) % 2 == 0)  # checkerboard
    assert_same((rows + cols) % 2 == 1)
    assert_same(cols % 2 == 0)  # stripes: across a row end too
    assert_same(rows % 2 == 0)


@pytest.mark.parametrize("density", [0.001, 0.05, 0.5, 0.95, 0.999])
@pytest.mark.parametrize("shape", [(7, 13), (100, 37), (513, 511)])
def test_random_masks(shape, density) -> None:
    rng = np.random.default_rng(round(density * 1000) + shape[0])
    assert_same(rng.random(shape) < density)


def test_every_label_of_a_multi_label_mask() -> None:
    rng = np.random.default_rng(7)
    # Blocks of random ids, a few noisy pixels, and every id 0..255 somewhere.
    mask = rng.integers(0, 256, (24, 20)).repeat(4, axis=0).repeat(3, axis=1).astype(np.uint8)
    noisy = rng.random(mask.shape) < 0.05
    mask[noisy] = rng.integers(0, 256, int(noisy.sum()))
    mask[-1, :256] = np.arange(256)[: mask.shape[1]]
    mask.flat[-256:] = rng.permutation(256)
    assert {BACKGROUND, IGNORE} <= set(np.unique(mask).tolist())
    assert np.unique(mask).size == 256
    label_ids = range(1, MAX_LABELS + 1)
    by_label = encode_brush_rles(mask, label_ids)
    assert list(by_label) == list(label_ids)
    for label_id in label_ids:
        assert_same(mask == label_id)
        assert by_label[label_id] == reference(mask == label_id)


@pytest.mark.parametrize("shape", [(0, 0), (1, 1), (1, 40), (40, 1), (77, 131), (480, 640)])
def test_labels_from_one_id_mask(shape) -> None:
    rng = np.random.default_rng(shape[0] + 1)
    # An upsampled label map with ignore noise, and labels that are absent, everywhere or alone.
    grid = rng.integers(0, 6, (8, 8))
    rows = np.arange(shape[0]) * 8 // max(shape[0], 1)
    cols = np.arange(shape[1]) * 8 // max(shape[1], 1)
    mask = grid[rows[:, None], cols[None, :]].astype(np.uint8)  # (H, W)
    mask[rng.random(shape) < 0.02] = IGNORE
    label_ids = [1, 2, 3, 4, 5, 9, IGNORE]
    by_label = brush_rle_bytes_by_label(mask, label_ids)
    assert list(by_label) == label_ids
    for label_id in label_ids:
        assert by_label[label_id].tolist() == encode_brush_rle(mask == label_id)
        if mask.size:
            assert by_label[label_id].tolist() == reference(mask == label_id)
    full = np.full(shape, 3, np.int32)
    assert encode_brush_rles(full, [3, 4]) == {
        3: encode_brush_rle(full == 3),
        4: encode_brush_rle(full == 4),
    }


@pytest.mark.parametrize("kind", ["blob", "sparse noise", "dense noise", "blob with holes"])
def test_large_masks(kind) -> None:
    rng = np.random.default_rng(11)
    shape = (768, 1024)
    masks = {
        "blob": lambda: blob(*shape),
        "sparse noise": lambda: rng.random(shape) < 0.01,
        "dense noise": lambda: rng.random(shape) < 0.3,
        "blob with holes": lambda: blob(*shape) & (rng.random(shape) > 0.002),
    }
    assert_same(masks[kind]())


def test_input_types_and_layouts_agree() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((31, 29)) < 0.4
    expected = reference(mask)
    for same in (
        mask.astype(np.uint8),
        mask.astype(np.uint8) * np.uint8(255),
        mask.astype(np.int64) * 7,
        mask.astype(np.float32),
        np.asfortranarray(mask),
    ):
        assert encode_brush_rle(same) == expected
    wide = rng.random((40, 60)) < 0.4
    view = wide[5:36, 3:60:2]  # not contiguous
    assert encode_brush_rle(view) == reference(np.ascontiguousarray(view))
    assert encode_brush_rle(wide.T) == reference(np.ascontiguousarray(wide.T))


def test_bytes_form_and_label_studio_decoder() -> None:
    mask = blob(37, 53)
    stream = brush_rle_bytes(mask)
    assert stream.dtype == np.uint8 and stream.ndim == 1
    assert stream.tolist() == encode_brush_rle(mask)
    rgba = brush.decode_rle(encode_brush_rle(mask)).reshape(37, 53, 4)  # (H, W, RGBA)
    np.testing.assert_array_equal(rgba, np.repeat(mask[..., None] * 255, 4, axis=2))


def test_mask_to_brush_rle_uses_it() -> None:
    mask = blob(61, 47)
    assert mask_to_brush_rle(mask) == encode_brush_rle(mask) == reference(mask)
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        mask_to_brush_rle(np.zeros((2, 3, 4), bool))


def test_mask_without_pixels() -> None:
    # The reference cannot encode an empty sequence; ours writes the header alone, which its
    # decoder reads as zero values.
    for shape in ((0, 0), (0, 5), (5, 0)):
        stream = encode_brush_rle(np.zeros(shape, bool))
        assert len(stream) == 7  # 53 header bits and 3 of padding
        assert brush.decode_rle(stream).size == 0


def test_errors_name_the_bad_input() -> None:
    with pytest.raises(ValueError, match=r"2-D \(H, W\), got shape \(4,\)"):
        brush_rle_bytes(np.zeros(4, bool))
    huge = np.broadcast_to(np.zeros(1, bool), (32_768, 32_768))  # 2**32 values, no memory
    with pytest.raises(ValueError, match=r"32768x32768.*4294967296 values.*4294967295"):
        brush_rle_bytes(huge)
    with pytest.raises(ValueError, match=r"1-D uint8.*int64"):
        rle_pack_bytes(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"2-D \(H, W\), got shape \(2, 2, 2\)"):
        encode_brush_rles(np.zeros((2, 2, 2), np.uint8), [1])


@pytest.mark.parametrize("alphabet", [2, 3, 256])
def test_generic_stream_with_lone_values(alphabet) -> None:
    # Runs of one value (literal tokens) never occur in a brush mask, whose pixels are four
    # values each; the generic encoder has them, and pieces whose last part is one value.
    rng = np.random.default_rng(alphabet)
    words = rng.integers(0, alphabet, 3000).astype(np.uint8)
    lengths = rng.choice([1, 1, 1, 2, 3, 7, 8, 9, 16, 17, 255, 256, 257], size=3000)
    values = np.repeat(words, lengths)
    assert rle_pack_bytes(values).tolist() == [int(v) for v in brush.encode_rle(values)]
    for length in FIELD_EDGES:
        values = np.repeat(np.array([9, 200, 9], np.uint8), [1, length, 1])
        assert rle_pack_bytes(values).tolist() == [int(v) for v in brush.encode_rle(values)]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_chunk_boundaries(monkeypatch, chunk) -> None:
    # Runs are encoded in chunks whose tokens share words at the seams; small chunks put seams
    # everywhere, long runs among them.
    monkeypatch.setattr(brush_rle, "_CHUNK_RUNS", chunk)
    rng = np.random.default_rng(chunk)
    assert_same(rng.random((45, 67)) < 0.3)
    assert_same(runs_row([1, 2, 16_385, 3, 50_000, 1, 1, 64, 65, 1]))
