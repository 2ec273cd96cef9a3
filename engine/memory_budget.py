"""The per-series memory budget: how many bytes decoding one series may take.

A series' need is worked out from what its headers declare, before any pixel data is decoded
or inflated: the stored pixel data (DICOM: Rows x Columns x frames x samples x BitsAllocated/8
of every file; NIfTI: the loaded volume's dims x the datatype's size) plus
:data:`FLOAT32_COPIES` times the float32 volume it becomes: the volume itself and the copies the
views are resampled through (measured: loading and building the views of a 256x256x160 16-bit
series peaks at 141 MiB for DICOM and 120 MiB for NIfTI, against a need of 140 MiB). A series
that needs more than the budget fails with "needs N GiB, budget M GiB"; inflation (Deflated
DICOM, ``.nii.gz``) stops at the budget too (:mod:`engine.bounded_read`).

The default is the smaller of 2 GiB and a quarter of the memory this process may use (the
machine's RAM, or a cgroup limit when one is set): MRI series are far below 2 GiB (a 1000-frame
512x512 16-bit Enhanced MR is 0.5 GB stored, 1 GB as float32), and two loaders decoding at once
on a small machine must leave room for the encoder.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from pathlib import Path
from typing import Iterator

from .errors import InputError, OverBudget, UsageError  # noqa: F401 (OverBudget: its old home)

GIB = 1024**3
MIB = 1024**2
DEFAULT_CAP = 2 * GIB
MIN_BUDGET = 1 * MIB  # below this not even a small slice decodes: a typo, not a budget
FLOAT32_COPIES = 3  # the float32 volume, and the views' working copies of it

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": MIB,
    "mb": 1000**2,
    "mib": MIB,
    "g": GIB,
    "gb": 1000**3,
    "gib": GIB,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def available_memory() -> int | None:
    """Bytes of memory this process may use: physical RAM, or a smaller cgroup limit."""
    found = []
    try:
        found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 2**60:  # "max" or a huge number: no limit
            found.append(int(text))
    return min(found) if found else None


@functools.lru_cache(maxsize=1)
def default_max_series_bytes() -> int:
    """min(2 GiB, a quarter of the memory available)."""
    memory = available_memory()
    return DEFAULT_CAP if memory is None else max(MIN_BUDGET, min(DEFAULT_CAP, memory // 4))


def parse_size(value: str | int | float) -> int:
    """Bytes from ``2GiB``, ``512 MiB``, ``1.5G`` or a plain number of bytes (K/M/G/T are
    binary, KB/MB/GB/TB decimal); a UsageError for anything else or under 1 MiB."""
    if isinstance(value, bool):
        raise UsageError(f"max series bytes {value!r}: give a size such as 2GiB or 512MiB")
    if isinstance(value, (int, float)):
        size = int(value)
    else:
        match = _SIZE.fullmatch(str(value))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise UsageError(f"max series bytes {value!r}: give a size such as 2GiB, 512MiB or a number of bytes")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size < MIN_BUDGET:
        raise UsageError(f"max series bytes {value!r}: at least 1 MiB")
    return size


def resolve(value: str | int | float | None) -> int:
    """The budget for a run: ``value`` parsed, or the default when None."""
    return default_max_series_bytes() if value is None else parse_size(value)


def series_need(stored_bytes: int, voxels: int) -> int:
    """Bytes loading a series takes: its stored pixel data and the float32 copies of its volume."""
    return stored_bytes + FLOAT32_COPIES * 4 * voxels


def gib(n: int | float) -> str:
    """Bytes as GiB for messages: three significant digits ("3.5", "0.0625", "2")."""
    return f"{n / GIB:.3g}"


def over_budget(what: str, needed: int, budget: int, detail: str = "") -> OverBudget:
    """The error for ``what`` needing ``needed`` bytes against ``budget``."""
    extra = f" ({detail})" if detail else ""
    return OverBudget(
        f"{what}: needs {gib(needed)} GiB{extra}, budget {gib(budget)} GiB; "
        f"raise it with --max-series-bytes if this is a real image"
    )


def check(what: str, needed: int, budget: int | None, detail: str = "") -> None:
    """Raise :class:`OverBudget` when ``needed`` exceeds ``budget`` (None: the default)."""
    budget = default_max_series_bytes() if budget is None else budget
    if needed > budget:
        raise over_budget(what, needed, budget, detail)


_CURRENT: contextvars.ContextVar[int | None] = contextvars.ContextVar("mrfm_max_series_bytes", default=None)


def current() -> int:
    """The budget of the scan or load in progress (readers read it to cap inflation)."""
    value = _CURRENT.get()
    return default_max_series_bytes() if value is None else value


@contextlib.contextmanager
def scoped(budget: int) -> Iterator[int]:
    """Make ``budget`` :func:`current` for this thread while the block runs."""
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)
