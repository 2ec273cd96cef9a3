"""Text columns any Zarr v3 implementation can read: one string per row as zero-padded UTF-8
bytes in a ``uint8`` array of shape (N, width), marked by the attribute ``{"text": "utf-8"}``.

zarr-python's variable-length ``string`` data type (and its ``fixed_length_utf32``) are
extensions that other implementations (tensorstore, zarrs, Rarr, ...) may not decode; ``uint8``
is a core data type every one of them reads. A reader decodes a row with
``bytes(row).rstrip(b"\\0").decode("utf-8")``. Stores written before this (variable-length
strings) are still read: :func:`read_text` accepts both.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

TEXT_ATTR = {"text": "utf-8"}


def encode_text(values: Iterable[Any], width: int | None = None) -> np.ndarray:
    """(N, width) uint8: each value's UTF-8 bytes, zero-padded. ``width`` defaults to the longest
    (at least 1); a value longer than a given ``width`` raises ValueError (never truncated)."""
    raw = [str(v).encode("utf-8") for v in values]
    longest = max((len(b) for b in raw), default=0)
    width = max(1, longest) if width is None else width
    if longest > width:
        raise ValueError(f"a text value of {longest} bytes does not fit a column {width} bytes wide")
    out = np.zeros((len(raw), width), dtype=np.uint8)
    for i, b in enumerate(raw):
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def decode_text(rows: np.ndarray) -> np.ndarray:
    """The str values (shape (N,)) of an (N, width) uint8 text array."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if rows.ndim == 1:  # one row read alone
        rows = rows.reshape(1, -1)
    if not len(rows):
        return np.zeros(0, dtype=str)
    return np.asarray([bytes(r).rstrip(b"\0").decode("utf-8", errors="replace") for r in rows], dtype=str)


def is_text(array: Any) -> bool:
    """An array written by this module (a uint8 (N, width) array marked ``text: utf-8``)."""
    try:
        return array.attrs.get("text") == "utf-8" and np.dtype(array.dtype) == np.uint8 and len(array.shape) == 2
    except Exception:
        return False


def read_text(array: Any, selection: Any = slice(None)) -> np.ndarray:
    """The str values of a text column at ``selection`` (rows), from this layout or from an
    older store's variable-length string array."""
    if is_text(array):
        return decode_text(np.asarray(array[selection]))
    values = np.asarray(array[selection])
    return (
        np.asarray([str(v) for v in values.tolist()], dtype=str).reshape(values.shape)
        if values.size
        else np.zeros(values.shape, dtype=str)
    )
