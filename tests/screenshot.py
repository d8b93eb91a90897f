"""Screenshots of an X display for GUI tests: `xwd` (Debian x11-apps) to PNG, in pure Python."""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

_HEADER = struct.Struct(">25I")


def xwd_to_png(xwd: bytes, crop: tuple[int, int, int, int] | None = None) -> bytes:
    """Convert an xwd dump of a TrueColor 24/32-bit screen (what Xvfb gives) to PNG bytes.

    `crop` is (x, y, width, height) in screen pixels.
    """
    (header_size, _version, pixmap_format, _depth, width, height, _xoffset, byte_order, _unit, _bit_order,
     _pad, bits_per_pixel, bytes_per_line, _visual, red_mask, green_mask, blue_mask, _bits_rgb,
     _entries, ncolors, *_rest) = _HEADER.unpack_from(xwd)
    if pixmap_format != 2 or bits_per_pixel != 32:
        raise ValueError(f"unsupported xwd image: format {pixmap_format}, {bits_per_pixel} bits per pixel")
    data = memoryview(xwd)[header_size + 12 * ncolors:]
    # A 32-bit pixel's bytes, in memory order, for each of red, green and blue.
    shifts = [(mask & -mask).bit_length() - 1 for mask in (red_mask, green_mask, blue_mask)]
    offsets = [shift // 8 if byte_order == 0 else 3 - shift // 8 for shift in shifts]
    x, y, w, h = crop or (0, 0, width, height)
    x, y = max(0, x), max(0, y)
    w, h = min(w, width - x), min(h, height - y)
    rows = bytearray()
    for row in range(y, y + h):
        line = data[row * bytes_per_line + 4 * x: row * bytes_per_line + 4 * (x + w)]
        rgb = bytearray(3 * w)
        for channel, offset in enumerate(offsets):
            rgb[channel::3] = line[offset::4]
        rows += b"\0" + rgb

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + chunk(b"IEND", b""))


def screenshot(display: str, path: Path, crop: tuple[int, int, int, int] | None = None) -> Path:
    """Save the X display's root window (cropped) as a PNG at `path`."""
    xwd = subprocess.run(["xwd", "-root", "-silent", "-display", display], capture_output=True, check=True,
                         timeout=30).stdout
    path.write_bytes(xwd_to_png(xwd, crop))
    return path
