from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuner.data.images import decode_image_rgb, inspect_image, load_image_rgb, upright_size
from tuner.errors import DataError


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _png_rgb16(path: Path, width: int, height: int, rgb: tuple[int, int, int]) -> Path:
    """A 48-bit RGB PNG, written by hand because Pillow cannot save one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + struct.pack(">HHH", *rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )
    return path


def test_half_transparent_red_is_composited_onto_the_background(tmp_path: Path) -> None:
    path = _save(Image.new("RGBA", (4, 3), (255, 0, 0, 128)), tmp_path / "a.png")
    image = load_image_rgb(path)
    assert image.mode == "RGB" and image.size == (4, 3)
    # 255 * 128/255 + 255 * 127/255 = 255 for red; 0 * 128/255 + 255 * 127/255 = 127 for green and blue.
    assert image.getpixel((1, 1)) == (255, 127, 127)
    on_black = load_image_rgb(path, background=(0, 0, 0))
    assert on_black.getpixel((1, 1)) == (128, 0, 0)


def test_grey_with_alpha_is_composited(tmp_path: Path) -> None:
    path = _save(Image.new("LA", (2, 2), (0, 0)), tmp_path / "la.png")
    assert load_image_rgb(path, background=(10, 200, 30)).getpixel((0, 0)) == (10, 200, 30)


def test_palette_transparency_shows_the_background(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    path = _save(image, tmp_path / "p.png", transparency=0)
    loaded = load_image_rgb(path, background=(0, 255, 0))
    assert loaded.getpixel((0, 0)) == (0, 255, 0)
    assert loaded.getpixel((1, 0)) == (0, 0, 255)


def test_greyscale_becomes_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("L", (2, 2), 77), tmp_path / "l.png")
    assert load_image_rgb(path).getpixel((0, 0)) == (77, 77, 77)


def test_cmyk_converts_multiplicatively(tmp_path: Path) -> None:
    # Half cyan and half black: red = (255 - 128) * (255 - 128) / 255 = 63; a naive 255 - c - k gives 0.
    path = _save(Image.new("CMYK", (2, 2), (128, 0, 0, 128)), tmp_path / "c.tif")
    assert load_image_rgb(path).getpixel((0, 0)) == (63, 127, 127)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 40000, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    red = [load_image_rgb(path).getpixel((x, 0))[0] for x in range(3)]
    assert red == [0, round(40000 / 257), 255]


def test_float_greyscale_in_unit_range_is_scaled(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), tmp_path / "f.tif")
    assert [load_image_rgb(path).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_16_bit_rgb_png_keeps_its_colour(tmp_path: Path) -> None:
    path = _png_rgb16(tmp_path / "rgb16.png", 3, 2, (60000, 30000, 0))
    pixel = load_image_rgb(path).getpixel((2, 1))
    assert all(abs(got - want / 257) <= 1 for got, want in zip(pixel, (60000, 30000, 0), strict=True))


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # Stored 40x20 with a red left half; orientation 6 means "rotate 90 degrees clockwise to display",
    # so the displayed image is 20x40 with the red half on top.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image_rgb(path)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 7, 8])
def test_upright_size_is_the_size_training_loads(tmp_path: Path, orientation: int) -> None:
    # The one header-only size every caller uses (data check, Qwen-VL token counts, grounding boxes).
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.new("RGB", (40, 20), "red"), tmp_path / "picture.jpg", exif=exif)
    assert upright_size(path) == upright_size(path.read_bytes()) == load_image_rgb(path).size
    assert upright_size(str(path)) == load_image_rgb(path).size


def test_upright_size_of_a_file_that_is_no_image_names_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(DataError, match=r"notes.png: cannot read the image size"):
        upright_size(path)


def test_truncated_png_is_unreadable(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = _save(Image.fromarray(noise), tmp_path / "whole.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.png.*cannot be decoded"):
        load_image_rgb(path)
    problem = inspect_image(path, max_pixels=10**8)
    assert problem is not None and problem.kind == "unreadable-image" and problem.file == str(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(DataError, match=r"empty.png.*empty"):
        load_image_rgb(path)
    problem = inspect_image(path, max_pixels=10**8)
    assert problem is not None and problem.kind == "zero-byte"


def test_text_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("not really a picture")
    with pytest.raises(DataError, match=r"notes.jpg.*not an image"):
        load_image_rgb(path)
    problem = inspect_image(path, max_pixels=10**8)
    assert problem is not None and problem.kind == "not-an-image"


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (30, 20)), tmp_path / "big.png")
    with pytest.raises(DataError, match=r"big.png.*30x20 \(600 pixels\).*599") as raised:
        load_image_rgb(path, max_pixels=599)
    assert "data.max_image_pixels" in (raised.value.hint or "")
    assert load_image_rgb(path, max_pixels=600).size == (30, 20)
    problem = inspect_image(path, max_pixels=599)
    assert problem is not None and problem.kind == "too-large"


def test_limit_above_pillows_own_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow refuses images above 2 * MAX_IMAGE_PIXELS on its own; a user who raised the setting must win.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = _save(Image.new("RGB", (30, 20)), tmp_path / "big.png")
    assert load_image_rgb(path, max_pixels=1000).size == (30, 20)


def test_small_image_is_reported_only_below_min_side(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (30, 20)), tmp_path / "small.png")
    problem = inspect_image(path, max_pixels=10**8, min_side=21)
    assert problem is not None and problem.kind == "too-small" and "30x20" in problem.what
    assert inspect_image(path, max_pixels=10**8, min_side=20) is None


def test_missing_file_is_reported(tmp_path: Path) -> None:
    problem = inspect_image(tmp_path / "gone.png", max_pixels=10**8)
    assert problem is not None and problem.kind == "missing-image"


def test_bytes_decode_like_files(tmp_path: Path) -> None:
    path = _save(Image.new("RGBA", (2, 2), (255, 0, 0, 128)), tmp_path / "a.png")
    assert decode_image_rgb(path.read_bytes(), "row 1").getpixel((0, 0)) == (255, 127, 127)
    with pytest.raises(DataError, match=r"row 2.*not an image"):
        decode_image_rgb(b"hello", "row 2")
