"""Images in: decoding a file or bytes (EXIF orientation, size limits, reduced JPEG decoding),
any image a user hands over -> an RGB uint8 array, and the model's input tensor."""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP; larger images are refused with a reason


class ImageError(Exception):
    """An image that cannot be used; the message says why (for skipped.jsonl and logs)."""


_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION) or 1)
    except (ValueError, TypeError, OSError, SyntaxError):  # a malformed EXIF block
        return 1


REDUCING_GAP = 2
"""A decode reduced for a smaller copy stays at least this many times the size asked for, as
PIL's ``reducing_gap``: a bicubic resize from there looks like one from the full image."""
STRIP_PIXELS = 4_000_000
"""Pixels of one strip of a full decode converted and reduced at a time (see
:func:`reduce_to_rgb`): the only full-resolution copy is the decode itself."""


class PixelGate:
    """At most ``capacity`` pixels being decoded at full size at once, across threads.

    A decode :meth:`hold` s its pixels while its full-resolution copy exists; one larger than
    the capacity runs when nothing else holds any. So reading threads that decode images ahead
    of a model hold about one largest image's worth of pixels at a time, whatever their number.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait until ``pixels`` fit (or nothing else is held), hold them for the block."""
        with self._free:
            self._free.wait_for(lambda: self.held == 0 or self.held + pixels <= self.capacity)
            self.held += pixels
        try:
            yield
        finally:
            with self._free:
                self.held -= pixels
                self._free.notify_all()


def decode_image(
    source: str | os.PathLike[str] | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    at_least: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
    *,
    on_size: Callable[[tuple[int, int]], None] | None = None,
    gate: PixelGate | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode an image, applying its EXIF orientation.

    ``at_least`` maps the full (width, height), as the image is shown, to the smallest size
    the caller needs. A JPEG is then decoded at the smallest of its DCT scales (1/2, 1/4, 1/8;
    PIL's draft mode) whose both sides are still at least that large: several times less work
    when only smaller copies are needed (a model input, a preview). Other formats are decoded
    at full size and brought at once to 8-bit RGB at a reduced size (at least
    :data:`REDUCING_GAP` times that size; :func:`reduce_to_rgb`), so a 16-bit or transparent
    picture costs its decode and little more.

    ``on_size`` is called with the full (width, height) as stored before anything is decoded
    (a caller's budget may raise there); ``gate`` bounds the pixels decoded at full size at
    once across threads.

    Returns:
        The decoded image (reduced or not) and the (width, height) of the full image as shown.

    Raises:
        ImageError: empty, unreadable, truncated, or larger than ``max_pixels``.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty file (0 bytes)")
        handle: Any = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            if path.stat().st_size == 0:
                raise ImageError("empty file (0 bytes)")
        except OSError as err:
            raise ImageError(f"cannot read file: {err.strerror or err}") from None
        handle = path
    try:
        with Image.open(handle) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, more than the limit "
                    f"of {max_pixels} (raise it with --max-pixels)"
                )
            if width == 0 or height == 0:
                raise ImageError(f"image has zero size ({width}x{height})")
            if on_size is not None:
                on_size((width, height))
            holding = gate.hold(width * height) if gate is not None else contextlib.nullcontext()
            with holding:
                orientation = _orientation(image)  # a PNG's EXIF may come after its pixels
                shown = (height, width) if orientation in _TRANSPOSED else (width, height)
                wanted = None
                if at_least is not None:
                    wanted = at_least(shown)
                    wanted = wanted[::-1] if orientation in _TRANSPOSED else wanted
                    wanted = (max(1, wanted[0]), max(1, wanted[1]))
                    image.draft(None, wanted)  # JPEG only
                image.load()
                picture: Image.Image = image
                if wanted is not None:
                    factor = min(image.width // wanted[0], image.height // wanted[1])
                    picture = reduce_to_rgb(image, max(1, factor // REDUCING_GAP))
                    picture.info = dict(image.info)
            if orientation != 1:
                return ImageOps.exif_transpose(picture), shown
            return picture, shown
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"image too large: {err}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"unreadable or truncated image: {err}") from None


def open_image(
    source: str | os.PathLike[str] | bytes, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open and fully decode an image, applying its EXIF orientation.

    Raises:
        ImageError: empty, unreadable, truncated, or larger than ``max_pixels``.
    """
    return decode_image(source, max_pixels)[0]


_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _from_high_bit(array: np.ndarray, extrema: tuple[float, float] | None = None) -> np.ndarray:
    """16-bit, 32-bit or float pixels -> uint8.

    ``extrema`` (low, high) of the whole image when ``array`` is a reduced copy of it: the
    scale is chosen from the whole image, as it would be at full size.
    """
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float64))
        high = array.max(initial=0.0) if extrema is None else max(0.0, extrema[1])
        top = 1.0 if high <= 1.0 else 255.0
        return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    array = array.astype(np.int64)
    low, high = (
        (array.min(initial=0), array.max(initial=0))
        if extrema is None
        else (min(0, extrema[0]), max(0, extrema[1]))
    )
    if high <= 255 and low >= 0:
        return array.astype(np.uint8)
    # 16-bit range (also for 32-bit containers of 16-bit data, as PIL's "I" mode often is).
    top = 65535 if high <= 65535 else int(high)
    return np.clip(array * 255.0 / top + 0.5, 0, 255).astype(np.uint8)


def reduce_to_rgb(image: Image.Image, factor: int) -> Image.Image:
    """A decoded image -> 8-bit RGB, ``factor`` times smaller on each side (box average).

    What :func:`to_rgb_array` would make of the image, then reduced, without a full-size copy
    other than the decode itself: the image is taken in strips of :data:`STRIP_PIXELS`, each
    converted and reduced alone. 16-bit and float pixels are scaled by the whole image's range;
    transparent pixels are averaged premultiplied by their alpha, then composited over white
    (the same as compositing first). An 8-bit RGB image with ``factor`` 1 is returned as is.
    """
    mode = image.mode
    if mode == "RGB" and factor == 1:
        return image
    extrema: tuple[float, float] | None = None
    if mode in _HIGH_BIT_MODES:
        low, high = image.getextrema()  # type: ignore[misc]
        extrema = (float(low), float(high))
        work = "F" if mode == "F" else "I"
    elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        work = "RGBa"  # premultiplied: a box average of it composites like the full image
    elif mode in ("RGB", "L"):
        work = mode
    else:
        work = "RGB"
    width, height = image.size
    out = np.empty((math.ceil(height / factor), math.ceil(width / factor), 3), np.uint8)
    rows = max(factor, STRIP_PIXELS // max(1, width) // factor * factor)
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        if strip.mode != work:
            strip = strip.convert("RGBA" if work == "RGBa" else work)
            strip = strip.convert(work) if strip.mode != work else strip
        if factor > 1:
            strip = strip.reduce(factor)
        out[top // factor : top // factor + strip.height] = _strip_rgb(strip, extrema)
    return Image.fromarray(out)


def _strip_rgb(strip: Image.Image, extrema: tuple[float, float] | None) -> np.ndarray:
    """One converted, reduced strip (RGB, L, RGBa, I or F) -> (h, w, 3) uint8."""
    array = np.asarray(strip)
    if strip.mode == "RGBa":  # premultiplied over white: colour + (255 - alpha)
        colour = array[..., :3].astype(np.int16) + (255 - array[..., 3:4].astype(np.int16))
        return np.clip(colour, 0, 255).astype(np.uint8)
    if strip.mode in ("I", "F"):
        array = _from_high_bit(array, extrema)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    return array


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite over white, as image viewers show transparent pixels."""
    weight = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * weight + 255.0 * (1.0 - weight)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ValueError(
            f"image array must be (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4), "
            f"got shape {array.shape}"
        )
    if array.dtype != np.uint8:
        array = _from_high_bit(array)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 2:  # grey + alpha
        return _composite(np.repeat(array[..., :1], 3, axis=-1), array[..., 1])
    if array.shape[-1] == 4:
        return _composite(array[..., :3], array[..., 3])
    return array


def _from_pil(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        return _from_array(np.asarray(image))
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _from_array(np.asarray(image.convert("RGBA")))
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def to_rgb_array(image: Any, index: int = 0) -> np.ndarray:
    """PIL image (any mode) or numpy array -> (H, W, 3) uint8.

    Grey, 16-bit and float images are scaled to 8 bits; alpha is composited over white;
    CMYK, YCbCr, palette and other PIL modes are converted.

    Raises:
        ValueError: zero-sized image or unsupported array shape, naming the image's position.
        TypeError: anything that is not an image.
    """
    if isinstance(image, Image.Image):
        width, height = image.size
        if width == 0 or height == 0:
            raise ValueError(f"image {index} has zero size ({width}x{height})")
        rgb = _from_pil(image)
    elif isinstance(image, np.ndarray):
        if image.size == 0 or image.ndim < 2 or 0 in image.shape[:2]:
            raise ValueError(f"image {index} has zero size (array shape {image.shape})")
        try:
            rgb = _from_array(image)
        except ValueError as err:
            raise ValueError(f"image {index}: {err}") from None
    else:
        raise TypeError(
            f"image {index} must be a PIL.Image.Image or a numpy array, got {type(image).__name__}"
        )
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def resize_for_model(image: np.ndarray | Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """The model's view of an image: (size, size, 3) uint8, bicubic resize of its RGB pixels
    (a (width, height) ``size`` gives (height, width, 3), the working image of tiles).

    ``image`` is an RGB uint8 array (from :func:`to_rgb_array`) or an RGB PIL image.
    """
    target = (size, size) if isinstance(size, int) else size
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    return np.asarray(picture.resize(target, Image.Resampling.BICUBIC))


def to_model_input(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 arrays -> (B, 3, size, size) float tensor in [-1, 1] (bicubic resize)."""
    batch = [resize_for_model(rgb, size) for rgb in images]  # B x (S, S, 3) uint8
    import torch

    pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
    return pixels.float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class PreparedImage:
    """An image already brought to the model's input size, with the size its mask must have.

    What ``StableSeg.prepare`` makes: the caller resizes (in worker threads, possibly from a
    reduced JPEG decode), and ``segment`` returns a mask of ``size`` without ever seeing the
    full-size pixels.

    Attributes:
        pixels: (S, S, 3) uint8 from :func:`resize_for_model` at the model's ``image_size``
            (with tiles: the (h, w, 3) working image, see :mod:`labeler.tiles`).
        size: (width, height) of the original image (EXIF orientation applied).
    """

    pixels: np.ndarray
    size: tuple[int, int]


def prepare_image(
    image: Any,
    side: int | Callable[[tuple[int, int]], tuple[int, int]],
    size: tuple[int, int] | None = None,
) -> PreparedImage:
    """An image (PIL or array, any mode) -> its :class:`PreparedImage` at ``side``.

    ``size`` is the (width, height) of the original when ``image`` is a reduced decode of it
    (:func:`decode_image`'s ``at_least``); the mask is made at that size. ``side`` may be a
    function of the original's (width, height) giving the (width, height) of the model's view
    (tiles' working image). Thread-safe and torch-free: readers call it in worker threads.
    """
    picture = image if isinstance(image, Image.Image) and image.mode == "RGB" else None
    if picture is None:
        picture = to_rgb_array(image)  # (h, w, 3) uint8
        shown = (picture.shape[1], picture.shape[0])
    else:
        shown = picture.size
    target = side(size or shown) if callable(side) else side
    return PreparedImage(resize_for_model(picture, target), size or shown)
