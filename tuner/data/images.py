"""Decode any image a user is likely to have into an 8-bit RGB PIL image, or say exactly why not.

Every failure becomes an `UnusableImage` (a `DataError` carrying the `Problem` that `tuner data check`
reports), so training and checking describe a bad file with the same words.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from tuner.data.problems import Problem
from tuner.errors import DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}
)

DEFAULT_MAX_PIXELS = 178_956_970
_MAX_PIXELS_SETTING = "data.max_image_pixels"
_TRANSPARENT_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_SRGB = ImageCms.createProfile("sRGB")
# The EXIF orientation tag; orientations 5-8 turn the picture by 90 degrees, so the upright image has
# width and height swapped.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
T = TypeVar("T")


class UnusableImage(DataError):
    """An image that cannot be used for training; `problem` is what `tuner data check` lists."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.file}: {problem.what}", hint=problem.fix)
        self.problem = problem


def load_image_rgb(
    path: Path,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Read `path` as an upright 8-bit RGB image; transparency is composited onto `background`.

    Raises `UnusableImage` (a `DataError`) for an empty, unreadable, truncated or oversized file.
    """
    path = Path(path)
    if not path.is_file():
        raise UnusableImage(
            Problem(
                str(path), "missing-image", "image file does not exist", "fix the path or restore the file"
            )
        )
    _refuse_empty(path.stat().st_size, str(path))
    return _decode(lambda: path.open("rb"), str(path), background, max_pixels, _to_rgb)


def decode_image_rgb(
    data: bytes,
    name: str,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """`load_image_rgb` for encoded bytes (an image stored inside a dataset); `name` is used in messages."""
    _refuse_empty(len(data), name)
    return _decode(lambda: io.BytesIO(data), name, background, max_pixels, _to_rgb)


def upright_size(image: str | Path | bytes) -> tuple[int, int]:
    """(width, height) of the image as `load_image_rgb` returns it (EXIF rotation applied), read from the
    header without decoding the pixels; raises `DataError` naming the file when it cannot be read."""
    encoded = isinstance(image, bytes)
    name = "an image stored in the dataset" if encoded else str(image)
    try:
        with (
            warnings.catch_warnings(),
            Image.open(io.BytesIO(image) if encoded else image) as opened,
        ):
            # Callers check the pixel limit themselves; Pillow's warning-level bomb check adds nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = opened.size
            orientation = opened.getexif().get(_EXIF_ORIENTATION)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(
            f"{name}: cannot read the image size ({error})", hint="re-save or remove the image"
        ) from error
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def load_alpha(image: Path | bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | None:
    """The upright alpha channel (mode "L") of a file or encoded bytes, or None when the image has none.

    Decodes as `load_image_rgb` does (EXIF orientation, size limit, the same `UnusableImage` errors), so
    the channel lines up pixel for pixel with the RGB image training sees.
    """
    if isinstance(image, Path):
        _refuse_empty(image.stat().st_size, name)
        return _decode(lambda: image.open("rb"), name, (0, 0, 0), max_pixels, _alpha_channel)
    _refuse_empty(len(image), name)
    return _decode(lambda: io.BytesIO(image), name, (0, 0, 0), max_pixels, _alpha_channel)


def inspect_image(path: Path, max_pixels: int, min_side: int = 0) -> Problem | None:
    """The problem that would stop `path` from training, or None. Decodes the whole image."""
    return _inspect(lambda: load_image_rgb(path, max_pixels=max_pixels), str(path), min_side)


def inspect_image_bytes(data: bytes, name: str, max_pixels: int, min_side: int = 0) -> Problem | None:
    """`inspect_image` for encoded bytes stored inside a dataset."""
    return _inspect(lambda: decode_image_rgb(data, name, max_pixels=max_pixels), name, min_side)


def too_large_problem(path: Path, max_pixels: int) -> Problem | None:
    """The `too-large` problem of an image whose header claims more than `max_pixels`, or None.

    Reads the header only; the caller still decodes (or verifies) the image with Pillow, which this
    lets open any image up to `max_pixels` (`data.max_image_pixels` decides, not Pillow's default)."""
    _let_pillow_open(max_pixels)
    try:
        _refuse_too_large(_header_size(functools.partial(Path(path).open, "rb")), str(path), max_pixels)
    except UnusableImage as error:
        return error.problem
    except (OSError, SyntaxError, ValueError, EOFError):
        return None  # not an image Pillow can open: the caller's decode reports it
    return None


def _inspect(load: Callable[[], Image.Image], name: str, min_side: int) -> Problem | None:
    try:
        image = load()
    except UnusableImage as error:
        return error.problem
    if min(image.size) < min_side:
        return Problem(
            name,
            "too-small",
            f"image is {image.width}x{image.height}, smaller than {min_side} px on its short side",
            "remove it or replace it with a larger version (upscaled images teach blur)",
        )
    return None


def _refuse_empty(size: int, name: str) -> None:
    if size == 0:
        raise UnusableImage(Problem(name, "zero-byte", "file is empty (0 bytes)", "remove it or re-copy it"))


def _decode(
    open_file: Callable[[], IO[bytes]],
    name: str,
    background: tuple[int, int, int],
    max_pixels: int,
    finish: Callable[[Image.Image, tuple[int, int, int]], T],
) -> T:
    """`finish(upright image, background)`: `_to_rgb` for training's RGB, `_alpha_channel` for a mask."""
    _let_pillow_open(max_pixels)
    try:
        with open_file() as file, warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning-level bomb check.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
            _refuse_too_large(image.size, name, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)
            return finish(image, background)
    except Image.DecompressionBombError:
        # Pillow's own guard fired inside Image.open; report it in our words with the header's size.
        _refuse_too_large(_header_size(open_file), name, max_pixels)
        raise
    except UnidentifiedImageError:
        raise UnusableImage(
            Problem(
                name,
                "not-an-image",
                "not an image file Pillow can read",
                "remove it or convert it to PNG/JPEG",
            )
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise UnusableImage(
            Problem(
                name,
                "unreadable-image",
                f"image cannot be decoded ({error})",
                "the file is probably truncated or corrupt: re-export or re-download it",
            )
        ) from None


def _header_size(open_file: Callable[[], IO[bytes]]) -> tuple[int, int]:
    """The size a header claims, read with Pillow's bomb guard off: Image.open decodes no pixels."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with open_file() as file, Image.open(file) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _let_pillow_open(max_pixels: int) -> None:
    # Pillow refuses images above 2 * Image.MAX_IMAGE_PIXELS (a process-wide setting) before we can read the
    # header. Raise it, never lower it, so the user's `max_image_pixels` is the limit that decides.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_pixels > 2 * limit:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1


def _refuse_too_large(size: tuple[int, int], name: str, max_pixels: int) -> None:
    pixels = size[0] * size[1]
    if pixels > max_pixels:
        raise UnusableImage(
            Problem(
                name,
                "too-large",
                f"image is {size[0]}x{size[1]} ({pixels:,} pixels), over the limit of {max_pixels:,} pixels",
                f"downscale it, or raise {_MAX_PIXELS_SETTING} if you trust the file",
            )
        )


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_grey_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode in ("CMYK", "RGB") and image.info.get("icc_profile"):
        return _to_srgb(image)
    return image.convert("RGB")


def _alpha_channel(image: Image.Image, _background: tuple[int, int, int]) -> Image.Image | None:
    # The images `_to_rgb` composites onto the background, and no others, have an alpha channel.
    if image.mode in _TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A")
    return None


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale high-bit-depth greyscale to 0..255 instead of clipping it (Pillow's convert("L") clips)."""
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if is_float and low >= 0 and high <= 1:
        scaled = values * 255
    elif not is_float and low >= 0 and high <= 65535:
        # Integer greyscale ("I;16*", or "I" from 16-bit PNG/TIFF) is 16-bit data: 65535 -> 255.
        scaled = values / 257
    else:
        # Floats outside 0..1 (depth, HDR) or wider integers have no fixed range: stretch what is there.
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_srgb(image: Image.Image) -> Image.Image:
    # An embedded profile says what the numbers mean (CMYK print profiles, Display P3 photos);
    # converting through it keeps colours right where a plain convert("RGB") would shift them.
    try:
        embedded = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        converted = ImageCms.profileToProfile(image, embedded, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError):
        return image.convert("RGB")
    assert converted is not None  # profileToProfile returns None only with inPlace=True
    return converted
