"""Image and mask reading: every file mode ends up as RGB uint8 / bool, bad files get DatasetError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmoniad.data import DatasetError, image_size, read_image, read_mask


def _save(path: Path, img: Image.Image, fmt: str | None = None) -> Path:
    img.save(path, format=fmt)
    return path


def _png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` but holds almost no data (a 'bomb')."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    out = read_image(_save(tmp_path / "a.png", Image.fromarray(RGB)))
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, RGB)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = RGB[..., 0]
    out = read_image(_save(tmp_path / "g.png", Image.fromarray(gray, mode="L")))
    assert out.shape == (12, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_palette_image_maps_through_its_palette(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([0, 0, 0, 200, 10, 30] + [0] * (256 * 3 - 6))
    img.putdata([0, 1, 1, 0, 1, 0, 0, 1])
    out = read_image(_save(tmp_path / "p.png", img))
    assert out[0, 1].tolist() == [200, 10, 30]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_rgba_drops_alpha_and_keeps_colours(tmp_path: Path) -> None:
    rgba = np.concatenate([RGB, np.full((12, 10, 1), 7, np.uint8)], axis=2)
    out = read_image(_save(tmp_path / "a.png", Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_array_equal(out, RGB)


def test_la_and_binary_images_are_converted(tmp_path: Path) -> None:
    la = Image.fromarray(np.stack([RGB[..., 0], RGB[..., 1]], axis=2), mode="LA")
    out = read_image(_save(tmp_path / "la.png", la))
    np.testing.assert_array_equal(out[..., 2], RGB[..., 0])
    binary = Image.fromarray(RGB[..., 0] > 128)
    out = read_image(_save(tmp_path / "b.png", binary))
    assert set(np.unique(out)) <= {0, 255}
    np.testing.assert_array_equal(out[..., 0] == 255, RGB[..., 0] > 128)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 257 * 100], [257 * 200, 65535, 128]], dtype=np.uint16)
    path = _save(tmp_path / "d.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    out = read_image(path)
    assert out[..., 0].tolist() == [[0, 1, 100], [200, 255, 0]]


def test_bmp_and_jpeg_are_read(tmp_path: Path) -> None:
    np.testing.assert_array_equal(read_image(_save(tmp_path / "a.bmp", Image.fromarray(RGB))), RGB)
    jpg = read_image(_save(tmp_path / "a.jpg", Image.fromarray(RGB)))
    assert jpg.shape == RGB.shape and jpg.dtype == np.uint8


def test_float_image_is_refused_with_its_path(tmp_path: Path) -> None:
    path = _save(tmp_path / "f.tif", Image.fromarray(np.ones((4, 4), np.float32)))
    with pytest.raises(DatasetError, match=r"f\.tif.*mode F"):
        read_image(path)


def test_truncated_image_names_the_path(tmp_path: Path) -> None:
    full = _save(tmp_path / "full.png", Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert image_size(cut) == (64, 64)  # the header is intact...
    with pytest.raises(DatasetError, match=r"cut\.png.*truncated"):
        read_image(cut)  # ...the pixels are not
    with pytest.raises(DatasetError, match=r"cut\.png"):
        read_mask(cut)


def test_unreadable_and_missing_files_name_the_path(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match=r"junk\.png.*not a readable image"):
        read_image(junk)
    with pytest.raises(DatasetError, match=r"junk\.png"):
        image_size(junk)
    with pytest.raises(DatasetError, match=r"nothere\.png.*no such"):
        read_image(tmp_path / "nothere.png")
    assert issubclass(DatasetError, ValueError)


def test_pixel_limit_refuses_before_decoding(tmp_path: Path) -> None:
    # 9000 x 9000 = 81 Mpx: over our limit, under Pillow's own bomb threshold.
    bomb = _png_with_header(tmp_path / "bomb.png", 9000, 9000)
    with pytest.raises(DatasetError, match=r"bomb\.png.*9000x9000.*limit"):
        read_image(bomb)
    with pytest.raises(DatasetError, match=r"bomb\.png.*limit"):
        image_size(bomb)
    huge = _png_with_header(tmp_path / "huge.png", 100_000, 100_000)  # Pillow refuses it itself
    with pytest.raises(DatasetError, match=r"huge\.png.*decompression bomb"):
        read_mask(huge)
    small = _save(tmp_path / "small.png", Image.fromarray(RGB))
    with pytest.raises(DatasetError, match="limit of 100"):
        read_image(small, max_pixels=100)


def test_mask_nonzero_is_anomalous_whatever_the_values(tmp_path: Path) -> None:
    values = np.array([[0, 1, 2], [38, 0, 255]], dtype=np.uint8)  # VisA-like, not 0/255
    out = read_mask(_save(tmp_path / "m.png", Image.fromarray(values, mode="L")))
    assert out.dtype == bool and out.shape == (2, 3)
    np.testing.assert_array_equal(out, values > 0)


def test_mask_modes_palette_rgb_sixteen_bit(tmp_path: Path) -> None:
    pal = Image.new("P", (3, 1))
    pal.putpalette([0, 0, 0, 1, 0, 0, 0, 0, 9] + [0] * (256 * 3 - 9))  # dark but non-black colours
    pal.putdata([0, 1, 2])
    assert read_mask(_save(tmp_path / "p.png", pal)).tolist() == [[False, True, True]]
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 1, 2] = 5
    assert read_mask(_save(tmp_path / "c.png", Image.fromarray(rgb))).tolist() == [[False, True, False]]
    deep = np.array([[0, 1, 65535]], np.uint16)
    assert read_mask(_save(tmp_path / "d.png", Image.fromarray(deep))).tolist() == [[False, True, True]]


def test_image_size_is_width_height(tmp_path: Path) -> None:
    assert image_size(_save(tmp_path / "a.png", Image.fromarray(RGB))) == (10, 12)
