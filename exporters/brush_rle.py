"""Label Studio brush RLE, encoded with numpy.

Label Studio stores a brush mask as the rle-pack bit stream (thi.ng/umbrella ``rle-pack``) of the
flattened RGBA image of the mask, every channel equal to the mask (0 or 255). The stream, most
significant bit first:

* a 53-bit header: the number of values (32 bits), the word size minus one (5 bits; 8-bit words)
  and the four run-length field widths minus one (4 bits each; widths 3, 4, 8 and 16);
* one token per run of equal values: a flag bit (1 = repeat one word, 0 = literal words), the
  index of the run-length field (2 bits), the run length minus one in that field's width, and the
  word (8 bits). A run uses the narrowest field that holds its length; a run longer than 256 uses
  the 16-bit field and is cut into pieces of 65,536 values (the last piece holds the rest, however
  short). A lone value is a literal token of one word;
* zero bits up to the next whole byte, and a whole zero byte when the stream already ends on one.

This is what ``label_studio_converter.brush.mask2rle`` writes, bit for bit; it builds the stream
as a Python string one run at a time. Here the runs come from one comparison of neighbouring
pixels, and each chunk of runs becomes tokens (integers and their widths, from a table indexed by
run length) that are summed into 32-bit words at their bit offsets: tokens never overlap, so
their sum is their bitwise or. Chunks keep the temporaries small enough to stay in cache. The
brushes of every label of an id mask come from the id mask's runs, found once.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_WORD_BITS = 8
_FIELD_WIDTHS = (3, 4, 8, 16)  # run-length field widths, in bits, by field index
_LONGEST_SHORT = 1 << _FIELD_WIDTHS[2]  # 256: longer runs use the last (16-bit) field
_PIECE = 1 << _FIELD_WIDTHS[3]  # 65,536: the longest run one token holds
_HEADER_BITS = 32 + 5 + 4 * len(_FIELD_WIDTHS)  # 53
_MAX_VALUES = (1 << 32) - 1  # the value count is a 32-bit field
_MAX_TOKEN_BITS = 1 + 2 + _FIELD_WIDTHS[3] + _WORD_BITS  # 27
_CHANNELS = 4  # RGBA: each pixel is four equal values
_OPAQUE = 255
_CHUNK_RUNS = 1 << 16  # runs encoded together; their temporaries (a few MB) stay in cache


def _token_tables() -> tuple[np.ndarray, np.ndarray]:
    """Token prefix (flag and field index, shifted in place) and width, by row.

    Row ``r`` < 256 is a run of ``r + 1`` values; row 256 is any run longer than 256.
    Returns two (257,) uint64 arrays.
    """
    prefixes = np.zeros(_LONGEST_SHORT + 1, dtype=np.uint64)
    widths = np.zeros(_LONGEST_SHORT + 1, dtype=np.uint64)
    for row in range(_LONGEST_SHORT + 1):
        length = row + 1
        field = next(
            (i for i, w in enumerate(_FIELD_WIDTHS[:-1]) if length <= 1 << w),
            len(_FIELD_WIDTHS) - 1,
        )
        width = _FIELD_WIDTHS[field]
        repeat = int(length > 1)  # a lone value is a literal (flag 0, field 0, count 0)
        prefixes[row] = (repeat << (2 + width + _WORD_BITS)) | (field << (width + _WORD_BITS))
        widths[row] = 1 + 2 + width + _WORD_BITS
    return prefixes, widths


_PREFIXES, _TOKEN_WIDTHS = _token_tables()


def _header(num_values: int) -> int:
    """The 53-bit header as an integer."""
    header = (num_values << 5) | (_WORD_BITS - 1)
    for width in _FIELD_WIDTHS:
        header = (header << 4) | (width - 1)
    return header


def _split_long_runs(
    counts: np.ndarray, rows: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs longer than 65,536 cut into pieces: (counts, rows, values) per token.

    ``counts`` are run lengths minus one, (R,) uint64; every piece keeps its run's row (256)
    and value, so a short last piece still uses the 16-bit field.
    """
    pieces = (counts // _PIECE + 1).astype(np.intp)  # (R,) tokens per run
    run = np.repeat(np.arange(counts.size), pieces)  # (T,) run of each token
    first = np.cumsum(pieces) - pieces  # (R,) its first token
    piece = (np.arange(run.size) - first[run]).astype(np.uint64)  # (T,) index within its run
    last = piece == pieces[run].astype(np.uint64) - 1
    counts = np.where(last, counts[run] - piece * _PIECE, _PIECE - 1)  # (T,)
    return counts.astype(np.uint64), rows[run], values[run]


def _encode_runs(num_values: int, bounds: np.ndarray, scale: int, values: np.ndarray) -> np.ndarray:
    """The stream of runs as (N,) uint8.

    Args:
        num_values: the length of the encoded sequence.
        bounds: (R + 1,) int64 run boundaries in the source, from 0 to its length.
        scale: sequence values per source element (4 for an RGBA mask's pixels).
        values: (R,) uint8 the word of each run.
    """
    num_runs = values.size
    most_tokens = num_runs + num_values // _PIECE + 1
    most_bits = _HEADER_BITS + _MAX_TOKEN_BITS * most_tokens
    words = np.zeros(most_bits // 32 + 3, dtype=np.uint32)  # big-endian words, native order
    header = _header(num_values) << (64 - _HEADER_BITS)
    words[0], words[1] = header >> 32, header & 0xFFFFFFFF
    offset = _HEADER_BITS  # bits written so far
    for start in range(0, num_runs, _CHUNK_RUNS):
        stop = min(start + _CHUNK_RUNS, num_runs)
        counts = (np.diff(bounds[start : stop + 1]) * scale - 1).astype(np.uint64)  # (C,)
        rows = np.minimum(counts, _LONGEST_SHORT).astype(np.intp)  # (C,)
        chunk_values = values[start:stop]
        if counts.max() >= _PIECE:
            counts, rows, chunk_values = _split_long_runs(counts, rows, chunk_values)  # (T,)
        bits = _TOKEN_WIDTHS[rows]  # (T,)
        codes = _PREFIXES[rows] | (counts << _WORD_BITS) | chunk_values
        ends = np.cumsum(bits)
        ends += offset
        starts = ends - bits  # (T,) absolute bit offsets
        # Each token in a 64-bit window that begins at the 32-bit word holding its first bit.
        windows = codes << (64 - (starts & 31) - bits)  # (T,)
        word_index = (starts >> 5).astype(np.intp)  # (T,) non-decreasing
        base = word_index[0]
        local = word_index - base
        span = int(local[-1]) + 2
        high = np.bincount(local, weights=windows >> 32, minlength=span)  # (span,) float64
        high[1:] += np.bincount(local, weights=windows & 0xFFFFFFFF, minlength=span)[:-1]
        words[base : base + span] |= high.astype(np.uint32)  # sums of disjoint bits are exact
        offset = int(ends[-1])
    num_bytes = offset // 8 + 1  # 1..8 zero bits of padding
    return words[: -(-num_bytes // 4)].astype(">u4").view(np.uint8)[:num_bytes]


def _run_bounds(sequence: np.ndarray) -> np.ndarray:
    """(R + 1,) int64: 0, the first index of every later run of equal values, and the length."""
    if sequence.size == 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.empty(sequence.size + 1, dtype=bool)  # (N + 1,) does a run start here
    starts[0] = starts[-1] = True
    np.not_equal(sequence[1:], sequence[:-1], out=starts[1:-1])
    return np.flatnonzero(starts)


def _check_count(num_values: int, what: str) -> None:
    if num_values > _MAX_VALUES:
        raise ValueError(f"{what}: {num_values} values; the format holds at most {_MAX_VALUES}")


def rle_pack_bytes(values: np.ndarray) -> np.ndarray:
    """The rle-pack stream of a 1-D uint8 sequence as (N,) uint8.

    Equals ``label_studio_converter.brush.encode_rle(values)`` (8-bit words, fields of 3, 4, 8
    and 16 bits).
    """
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype != np.uint8:
        raise ValueError(
            f"rle_pack_bytes: values must be 1-D uint8, got shape {values.shape} "
            f"and dtype {values.dtype}"
        )
    _check_count(values.size, "rle_pack_bytes")
    bounds = _run_bounds(values)  # (R + 1,)
    return _encode_runs(values.size, bounds, 1, values[bounds[:-1]])


def brush_rle_bytes(binary: np.ndarray) -> np.ndarray:
    """Label Studio brush RLE of an (H, W) mask as (N,) uint8; nonzero pixels are the mask.

    Equals ``label_studio_converter.brush.mask2rle`` of the mask as 0/255: the mask is the alpha
    (and every other channel) of an RGBA image, 255 inside and 0 outside.
    """
    binary = np.asarray(binary)
    if binary.ndim != 2:
        raise ValueError(f"brush_rle_bytes: mask must be 2-D (H, W), got shape {binary.shape}")
    _check_count(binary.size * _CHANNELS, f"brush_rle_bytes ({binary.shape[0]}x{binary.shape[1]})")
    flat = binary.reshape(-1)  # (H * W,)
    if flat.dtype != np.bool_:
        flat = flat != 0
    return _mask_stream(flat.size, _run_bounds(flat), bool(flat.size and flat[0]))


def _mask_stream(num_pixels: int, bounds: np.ndarray, first_inside: bool) -> np.ndarray:
    """The brush stream of a mask given as (R + 1,) pixel run bounds; runs alternate."""
    values = np.zeros(bounds.size - 1, dtype=np.uint8)  # (R,)
    values[0 if first_inside else 1 :: 2] = _OPAQUE
    return _encode_runs(num_pixels * _CHANNELS, bounds, _CHANNELS, values)


def brush_rle_bytes_by_label(mask: np.ndarray, label_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """The brush RLE of ``mask == k`` for each k of ``label_ids``, as (N,) uint8 each.

    Faster than one call of ``brush_rle_bytes`` a label: the runs of the (H, W) id mask are
    found once, and each label's runs are merged from them.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(
            f"brush_rle_bytes_by_label: mask must be 2-D (H, W), got shape {mask.shape}"
        )
    _check_count(
        mask.size * _CHANNELS, f"brush_rle_bytes_by_label ({mask.shape[0]}x{mask.shape[1]})"
    )
    flat = mask.reshape(-1)  # (H * W,)
    id_bounds = _run_bounds(flat)  # (Q + 1,) runs of equal ids
    run_ids = flat[id_bounds[:-1]]  # (Q,)
    streams = {}
    for label_id in label_ids:
        inside = run_ids == label_id  # (Q,)
        bounds = id_bounds[_run_bounds(inside)]  # (R + 1,) the label's runs, in pixels
        streams[label_id] = _mask_stream(flat.size, bounds, bool(inside.size and inside[0]))
    return streams


def encode_brush_rles(mask: np.ndarray, label_ids: Iterable[int]) -> dict[int, list[int]]:
    """``encode_brush_rle(mask == k)`` for each k of ``label_ids``, from the runs of ``mask``."""
    return {k: stream.tolist() for k, stream in brush_rle_bytes_by_label(mask, label_ids).items()}


def encode_brush_rle(binary: np.ndarray) -> list[int]:
    """Label Studio brush RLE of an (H, W) mask as the list of byte values its JSON holds.

    Byte for byte ``label_studio_converter.brush.mask2rle`` of the mask as 0/255.
    """
    return brush_rle_bytes(binary).tolist()
