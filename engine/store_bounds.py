"""Limits on what a store's bytes may make mrfm do: a store is untrusted input.

A received or damaged store can declare anything: a ``zarr.json`` of 50 MB, JSON nested 100,000
deep, an array shape of 10^63, an embedding matrix of 10^9 rows. Every read of a node's metadata
goes through :func:`parse_metadata`, and every array is checked by :func:`array_problem` before
its chunks are listed or read, so such a node becomes a problem that names it (validate, inspect,
the next run's redo), never a recursion error, an allocation of gigabytes or a hang.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .zarr_nodes import NodeUnreadable

MAX_META_BYTES = (
    8 * 1024 * 1024
)  # a zarr.json this store writes is kilobytes; a run record with many roots, far below this
MAX_JSON_DEPTH = 64  # the deepest document mrfm writes nests ~8 levels
MAX_ARRAY_BYTES = (
    8 * 1024**3
)  # one array decoded whole: a 2048^3 uint8 mask; past this a declared shape is not believed
MAX_CHUNKS = 1_000_000  # chunk (or shard) files listed per array
RAW_CODECS = {"bytes", "crc32c"}  # layouts whose stored size follows from the declared shape


def parse_metadata(key: str, raw: bytes) -> dict[str, Any]:
    """A node's ``zarr.json`` as a dict; raises NodeUnreadable ('key: why') when it is too large,
    too deep, not JSON or not Zarr v3 metadata."""
    if len(raw) > MAX_META_BYTES:
        raise NodeUnreadable(
            f"{key}: metadata of {len(raw):,} bytes or more is over the {MAX_META_BYTES // 2**20} MiB limit"
        )
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise NodeUnreadable(f"{key}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "truncated JSON" if raw and not raw.rstrip().endswith(b"}") else "invalid JSON"
        raise NodeUnreadable(f"{key}: {kind} ({exc})") from None
    if _depth(meta) > MAX_JSON_DEPTH:
        raise NodeUnreadable(f"{key}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise NodeUnreadable(f"{key}: not Zarr v3 metadata")
    return meta


def _depth(doc: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a deep document must not overflow here)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def array_problem(path: str, meta: dict[str, Any], stored_bytes: int | None = None) -> str | None:
    """Why an array's declared shape and chunk grid are not believable, or None: dimensions that
    are not non-negative integers, more than MAX_ARRAY_BYTES decoded, more than MAX_CHUNKS chunk
    files, or (for an uncompressed layout, when ``stored_bytes`` is given) more data declared than
    its chunk files hold."""
    shape, chunks = meta.get("shape"), (((meta.get("chunk_grid") or {}).get("configuration")) or {}).get("chunk_shape")
    where = f"{path}/zarr.json"
    if not _dims(shape) or not _dims(chunks) or len(shape) != len(chunks) or 0 in chunks:
        return f"{where}: shape {_short(shape)} or chunk shape {_short(chunks)} is not a grid of non-negative integers"
    nbytes = math.prod(shape) * _itemsize(meta.get("data_type"))
    if nbytes > MAX_ARRAY_BYTES:
        return f"{where}: shape {_short(shape)} declares {_size(nbytes)}, over the {_size(MAX_ARRAY_BYTES)} a store array may hold"
    files = math.prod(math.ceil(s / c) for s, c in zip(shape, chunks))
    if files > MAX_CHUNKS:
        return f"{where}: shape {_short(shape)} in chunks of {_short(chunks)} declares {files:,} chunk files, over {MAX_CHUNKS:,}"
    codecs = {c.get("name") for c in meta.get("codecs") or [] if isinstance(c, dict)}
    if stored_bytes is not None and codecs and codecs <= RAW_CODECS and nbytes > stored_bytes:
        return f"{where}: shape {_short(shape)} declares {_size(nbytes)} but its chunks hold {_size(stored_bytes)}"
    return None


def _dims(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _itemsize(dtype: Any) -> int:
    """Bytes per element of a Zarr v3 data type (strings and unknown types count one byte: a floor)."""
    sizes = {
        "bool": 1,
        "int8": 1,
        "uint8": 1,
        "int16": 2,
        "uint16": 2,
        "float16": 2,
        "int32": 4,
        "uint32": 4,
        "float32": 4,
        "int64": 8,
        "uint64": 8,
        "float64": 8,
        "complex64": 8,
        "complex128": 16,
    }
    return sizes.get(dtype, 1) if isinstance(dtype, str) else 1


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list) and len(value) <= 8 else f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _size(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.3g} GiB"
    return f"{nbytes / 2**20:.3g} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


__all__ = ["MAX_ARRAY_BYTES", "MAX_CHUNKS", "MAX_JSON_DEPTH", "MAX_META_BYTES", "array_problem", "parse_metadata"]
