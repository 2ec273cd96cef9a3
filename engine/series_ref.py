"""A series found by discovery, as readers build it and every later stage receives it.

Readers (``engine.dicom``, ``engine.nifti``, third-party ones) and discovery both import this
module, so neither imports the other for it. ``sanitise_key`` is the one rule that turns a UID or
a file name into a key that is safe as a store path; ``engine.discover`` re-exports both names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a Source is what discovery walks; only its type is named here
    from .discover import Source


@dataclass
class SeriesRef:
    """A series found by ``scan``: what it is, where its files are, and what looked wrong.

    ``dims`` is the shape of the volume ``load`` returns: (columns, rows, slices) for DICOM,
    i.e. (I, J, K) in the engine's convention, and the image shape for NIfTI.
    """

    key: str
    reader: str
    study_uid: str
    series_uid: str
    modality: str
    description: str
    sources: list["Source"]
    dims: tuple[int, ...]
    n_slices: int
    orientation: str
    problems: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # reader-private: what loading needs from the scan (DICOM: per-file frames and pixel plans),
    # so a worker reads pixel data without parsing headers again
    plan: Any = field(default=None, repr=False, compare=False)
    # bytes decoding needs by what the headers declare (None: the reader does not say), and the
    # budget the series was scanned under: ``load`` refuses before decoding when need > budget
    needs_bytes: int | None = field(default=None, compare=False)
    max_bytes: int | None = field(default=None, compare=False)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitise_key(text: str) -> str:
    """Reduce a UID or file name to characters that are safe in store paths (never '.', '..' or a
    hidden name; room left under 128 characters for a duplicate's suffix)."""
    return _UNSAFE.sub("_", text).strip("_").lstrip(".")[:120] or "series"
