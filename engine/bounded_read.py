"""Reads whose size an input decides, kept within caps: inflation and small text files.

One home for the caps every compressed input shares (zip members, Deflated DICOM, ``.gz``):
a size cap and a ratio cap. Deflate cannot beat ~1032:1; image data (even zero-padded masks)
stays far below 400:1 at sizes past 32 MiB, while runs of zeros built to exhaust memory sit
near the maximum. Inflation is streamed: the cap stops it before the bytes exist.

Small text inputs (a ``--report`` file, a ``--job`` file) are read only when they are regular
files under :data:`TEXT_FILE_MAX_BYTES`; ``/dev/zero`` or a FIFO is refused, never read.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import IO

from .errors import UsageError
from .memory_budget import OverBudget, gib

# No MRI file we load is near 2 GiB (a 1000-frame 512x512 16-bit Enhanced MR is 0.5 GB), and the
# NIfTI reader holds a zip member in memory: a larger declared size is refused unread.
ZIP_MEMBER_MAX_BYTES = 2 * 1024**3
MAX_RATIO = 400
RATIO_MIN_BYTES = 32 * 1024**2
TEXT_FILE_MAX_BYTES = 16 * 1024**2  # a radiology report or a job file is kilobytes

_IN_CHUNK = 64 * 1024
_OUT_CHUNK = 1024 * 1024

GZIP_WBITS = 31  # zlib header detection off, gzip wrapper
RAW_DEFLATE_WBITS = -15  # Deflated Explicit VR Little Endian: a raw deflate stream


def ratio_problem(inflated: int, compressed: int) -> str | None:
    """Why ``inflated`` bytes from ``compressed`` look like a bomb, or None."""
    ratio = inflated / max(compressed, 1)
    if inflated >= RATIO_MIN_BYTES and ratio > MAX_RATIO:
        return f"compressed more than {MAX_RATIO}:1 ({ratio:.0f}:1 after {gib(inflated)} GiB)"
    return None


def inflate(
    fh: IO[bytes], *, limit: int, what: str, wbits: int = GZIP_WBITS, prefix: bytes = b"", want: int | None = None
) -> bytes:
    """The inflated bytes of the stream ``fh`` (``prefix`` first), streamed in chunks; with
    ``want``, only the first ``want`` bytes (the rest is never inflated).

    Stops with :class:`~engine.memory_budget.OverBudget` naming ``what`` once the output would
    pass ``limit`` bytes or the ratio cap; a corrupt or truncated stream raises ``zlib.error``
    or ``EOFError``. Concatenated gzip members are read one after another, as gzip does."""
    out = bytearray()
    d = zlib.decompressobj(wbits)
    consumed = 0
    pending = prefix
    while True:
        if not pending:
            pending = fh.read(_IN_CHUNK)
            if not pending:
                break
        consumed += len(pending)
        data = d.decompress(pending, _OUT_CHUNK)
        while True:
            _grow(out, data, limit, consumed, what)
            if want is not None and len(out) >= want:
                return bytes(out[:want])
            if not d.unconsumed_tail:
                break
            data = d.decompress(d.unconsumed_tail, _OUT_CHUNK)
        pending = b""
        if d.eof:
            rest = d.unused_data
            if wbits != GZIP_WBITS or not rest.strip(b"\0"):
                return bytes(out)
            consumed -= len(rest)
            d, pending = zlib.decompressobj(wbits), rest  # another gzip member follows
    if not d.eof:
        raise EOFError(f"{what}: compressed stream ends early (truncated file)")
    return bytes(out)


def _grow(out: bytearray, data: bytes, limit: int, consumed: int, what: str) -> None:
    if len(out) + len(data) > limit:
        raise OverBudget(
            f"{what}: inflating needs more than {gib(limit)} GiB, budget {gib(limit)} GiB; "
            "raise it with --max-series-bytes if this is a real image"
        )
    out += data
    problem = ratio_problem(len(out), consumed)
    if problem:
        raise OverBudget(f"{what}: {problem}; not inflated further (a decompression bomb)")


def read_text_file(path: str | Path, *, what: str, limit: int = TEXT_FILE_MAX_BYTES) -> str:
    """A small UTF-8 text file (invalid bytes replaced): a regular file of at most ``limit``
    bytes, else a :class:`~engine.errors.UsageError` naming ``what`` and the reason."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{what} {path}: not a regular file")
        if info.st_size > limit:
            raise UsageError(
                f"{what} {path}: {info.st_size} bytes, more than the {limit // 1024**2} MiB a {what} may hold"
            )
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise UsageError(f"{what} {path}: more than the {limit // 1024**2} MiB a {what} may hold")
    return data.decode("utf-8", errors="replace")
