"""Own the fake upstream's images: the sizes it draws and the gradient PNG a file URL names."""

from __future__ import annotations

import functools
import re
import struct
import zlib

IMAGE_SIZES = frozenset(
    {(256, 256), (512, 512), (1024, 1024), (1792, 1024), (1024, 1792), (1536, 1024), (1024, 1536)}
)
_IMAGE_RE = re.compile(r"/v1/files/img-(\d{3,4})x(\d{3,4})-([0-9a-f]{6})(?:-[0-9a-z]+)?\.png")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    """Frame one PNG chunk (length, tag, data, CRC)."""
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@functools.lru_cache(maxsize=128)
def png_image(width: int, height: int, rgb: int) -> bytes:
    """Return a valid RGB PNG: a vertical gradient from rgb down to half its brightness."""
    red, green, blue = rgb >> 16, (rgb >> 8) & 255, rgb & 255
    compressor = zlib.compressobj(1)
    rows: dict[int, bytes] = {}
    parts = []
    for y in range(height):
        shade = 256 - (y * 128) // height
        row = rows.get(shade)
        if row is None:
            pixel = bytes(((red * shade) >> 8, (green * shade) >> 8, (blue * shade) >> 8))
            row = rows[shade] = b"\x00" + pixel * width
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
