"""lorayard.vision: images decoded within limits (a decompression bomb refused from its header, before
any pixel is allocated) and each image's placeholder expanded to its pad tokens."""

from __future__ import annotations

import struct
import zlib

import pytest

from lorayard.testing.shapes import png_bytes, shape_image
from lorayard.vision import ImageError, ImageLimits, decode_image, expand_image_pads


def _claiming(width: int, height: int) -> bytes:
    """A real 24x24 PNG whose header claims a width x height canvas (its CRC fixed): what a decompression
    bomb looks like before its pixels are inflated."""
    data = bytearray(png_bytes(shape_image("red", "square", (24, 24))))
    ihdr = 8 + 4  # after the signature and the chunk's length
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_a_bomb_is_refused_from_its_header():
    # Past our limit (4096 x 4096 by default): refused by ours, from the header.
    with pytest.raises(ImageError, match="5000x5000"):
        decode_image(_claiming(5000, 5000), ImageLimits())
    # Far past it: PIL refuses it already while opening it.
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(_claiming(1_000_000, 1_000_000), ImageLimits())


def test_limits_and_junk():
    data = png_bytes(shape_image("red", "circle", (64, 64)))
    assert decode_image(data, ImageLimits()).image.size == (64, 64)
    with pytest.raises(ImageError, match="pixels"):
        decode_image(data, ImageLimits(max_pixels=63 * 64))
    with pytest.raises(ImageError, match="bytes"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"GIF89a-not-really", ImageLimits())
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(_claiming(64, 64), ImageLimits())  # pixels for 24x24 only: truncated


def test_same_bytes_same_hash():
    data = png_bytes(shape_image("red", "circle"))
    other = png_bytes(shape_image("green", "circle"))
    assert decode_image(data, ImageLimits()).sha256 == decode_image(data, ImageLimits()).sha256
    assert decode_image(data, ImageLimits()).sha256 != decode_image(other, ImageLimits()).sha256


def test_placeholders_expand_one_per_image():
    assert expand_image_pads([1, 9, 2, 9, 3], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9, 3]
    with pytest.raises(ValueError, match="3 image placeholders for 2 images"):
        expand_image_pads([9, 9, 9], 9, [1, 1])
