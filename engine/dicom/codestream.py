"""What a compressed frame's own codestream declares, read from its first bytes.

The budget is checked against the DICOM header (Rows x Columns), but a JPEG or JPEG 2000 decoder
allocates what its codestream says: a 216-byte JPEG 2000 fragment can say 16384 x 16384 inside a
file whose header says 32 x 32, and the decoder fills 512 MiB before the mismatch is noticed.
Every fragment that starts a codestream is read up to its size marker (JPEG SOFn, JPEG 2000 SIZ)
and refused when it declares more samples than the header does.
"""

from __future__ import annotations

import struct

from ..discover import LoadError, Source

_ITEM = b"\xfe\xff\x00\xe0"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JPEG_SOI = b"\xff\xd8"
# SOF markers: C0-CF except DHT (C4), JPG (C8), DAC (CC); F7 is JPEG-LS SOF55
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
_HEAD = 64 * 1024  # a SOF sits after tables and application segments, well within this


def codestream_size(head: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG / JPEG-LS / JPEG 2000 codestream declares, or None
    when ``head`` starts no codestream this knows (RLE, a JP2 wrapper, a continuation)."""
    if head.startswith(_J2K_SOC_SIZ) and len(head) >= 42:
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", head[8:24])
        components = struct.unpack(">H", head[40:42])[0]
        return max(0, ysiz - yo), max(0, xsiz - xo), components
    if not head.startswith(_JPEG_SOI):
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", head[pos + 2 : pos + 4])[0]
        if marker in _SOF and pos + 10 <= len(head):
            rows, cols = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return rows, cols, head[pos + 9]
        pos += 2 + length
    return None


def check_fragments(source: Source, raw: bytes, rows: int, cols: int, samples: int) -> None:
    """Raise LoadError when a fragment of encapsulated pixel data ``raw`` starts a codestream
    declaring more than ``rows`` x ``cols`` x ``samples`` (each frame's size in the header)."""
    pos, first = 0, True
    while pos + 8 <= len(raw) and raw[pos : pos + 4] == _ITEM:
        length = struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        start = pos + 8
        if not first:  # the first item is the basic offset table
            declared = codestream_size(raw[start : start + min(length, _HEAD)])
            if declared is not None and declared[0] * declared[1] * max(declared[2], 1) > rows * cols * max(samples, 1):
                raise LoadError(
                    f"{source}: a compressed frame declares {declared[0]} x {declared[1]} x {declared[2]} samples, "
                    f"the header {rows} x {cols} x {samples}; not decoded"
                )
        first = False
        pos = start + length
