"""Zarr v3 nodes as the result store writes them: codecs, chunking, and small nodes encoded
directly (a group's or a one-chunk array's ``zarr.json`` and its chunk as bytes, ready to be
written together).

A series holds ~20 small nodes (scores, box columns, embeddings). Through zarr's array API each
costs ~3 ms of metadata validation, dtype matching and codec set-up, far more than its bytes;
encoded here they cost microseconds and a store writes them in one concurrent pass. The format is
zarr's own: each array's metadata starts from a document zarr itself wrote for the same dtype,
rank and codecs (made once per kind, in memory), and its chunk is encoded by the same codecs
(bytes or vlen-utf8, optional zstd, then crc32c). Tests read every node back through zarr.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from functools import lru_cache
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .errors import NodeUnreadable  # noqa: F401 (re-exported: the store modules catch it from here)

Documents = dict[str, bytes]  # key relative to the node's parent -> bytes


WRITE_ALL = {"write_empty_chunks": True}  # every chunk exists: a missing one is damage, not fill


def now() -> str:
    """The UTC timestamp every record in a store carries."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def store_codecs(compress: bool = True) -> list[Any]:
    """Bytes-to-bytes codecs of every array: crc32c last, so it covers the stored bytes."""
    return [ZstdCodec(level=3), Crc32cCodec()] if compress else [Crc32cCodec()]


SMALL_BYTES = 64 * 1024  # below this an array is stored raw: compressing it saves nothing worth a codec call
MASK_CHUNK = 64  # mask chunk side: a 64^3 uint8 chunk is 256 KiB, partial reads stay cheap


def mask_chunks(shape: tuple[int, ...], itemsize: int = 1) -> tuple[int, ...]:
    """Chunks for a mask: cubes of MASK_CHUNK voxels, the grid itself along shorter axes."""
    return tuple(max(1, min(MASK_CHUNK, s)) for s in shape)


def small_array_kwargs(
    value: np.ndarray, attributes: dict[str, Any] | None, chunk_rows: int | None = None
) -> dict[str, Any]:
    """create_array arguments of a small output or index column: one chunk, raw unless worth compressing."""
    dtype = str if value.dtype.kind in "UT" else value.dtype
    # one chunk per small array; zarr wants chunk sides >= 1, and "auto" for 0-d arrays
    chunks: Any = tuple(max(1, s) for s in value.shape) if value.ndim else "auto"
    if chunk_rows and value.ndim in (1, 2):
        chunks = (max(1, min(chunk_rows, value.shape[0])), *value.shape[1:])
    compress = dtype is str or value.nbytes >= SMALL_BYTES or bool((attributes or {}).get("text"))
    return {
        "shape": value.shape,
        "dtype": dtype,
        "chunks": chunks,
        "fill_value": "" if dtype is str else 0,
        "compressors": store_codecs(compress),
        "config": WRITE_ALL,
        "attributes": attributes,
    }


def write_array(
    group: zarr.Group,
    name: str,
    value: np.ndarray,
    attributes: dict[str, Any] | None = None,
    chunk_rows: int | None = None,
) -> zarr.Array:
    """A small array through zarr's API (index columns, which are appended to later)."""
    value = np.asarray(value)
    a = group.create_array(name, **small_array_kwargs(value, attributes, chunk_rows))
    if value.size:
        a[...] = value
    return a


def group_document(attributes: dict[str, Any]) -> bytes:
    return _json({"zarr_format": 3, "node_type": "group", "attributes": attributes})


def array_documents(name: str, value: np.ndarray, codecs: list[Any], attributes: dict[str, Any] | None) -> Documents:
    """``name/zarr.json`` and, unless the array is empty, its single chunk, for ``value`` stored
    as one chunk with ``codecs`` (bytes-to-bytes: zstd and/or crc32c, as the store uses)."""
    value = np.asarray(value)
    strings = value.dtype.kind in "UOT"
    kind = ("str", value.ndim) if strings else (value.dtype.newbyteorder("<").str, value.ndim)
    meta = copy.deepcopy(_template(kind, tuple(_codec_key(c) for c in codecs)))
    meta["shape"] = list(value.shape)
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [max(1, s) for s in value.shape]
    meta["attributes"] = attributes or {}
    docs = {f"{name}/zarr.json": _json(meta)}
    if value.size:
        chunk = "c" if value.ndim == 0 else "c/" + "/".join("0" * value.ndim)
        docs[f"{name}/{chunk}"] = _encode(value, strings, meta["codecs"])
    return docs


def _encode(value: np.ndarray, strings: bool, codecs: list[dict[str, Any]]) -> bytes:
    if strings:
        raw = numcodecs.VLenUTF8().encode(np.asarray(value, dtype=object).ravel())
    else:
        raw = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    for codec in codecs[1:]:
        if codec["name"] == "zstd":
            conf = codec.get("configuration", {})
            raw = numcodecs.Zstd(level=conf.get("level", 0), checksum=conf.get("checksum", False)).encode(raw)
        elif codec["name"] == "crc32c":
            raw = raw + google_crc32c.value(raw).to_bytes(4, "little")
        else:  # pragma: no cover - only the store's own codecs come here
            raise ValueError(f"codec {codec['name']!r} is not encoded here")
    return bytes(raw)


def _codec_key(codec: Any) -> str:
    return json.dumps(codec.to_dict(), sort_keys=True)


@lru_cache(maxsize=64)
def _template(kind: tuple[str, int], codec_keys: tuple[str, ...]) -> dict[str, Any]:
    """The metadata zarr writes for a one-chunk array of this dtype and rank with these codecs."""
    from zarr.core.buffer import default_buffer_prototype  # zarr internals for decoding one in-memory document
    from zarr.core.sync import sync  # zarr internals for decoding one in-memory document
    from zarr.registry import get_codec_class  # zarr internals for decoding one in-memory document
    from zarr.storage import MemoryStore  # zarr internals for decoding one in-memory document

    dtype, ndim = kind
    codecs = [get_codec_class(d["name"]).from_dict(d) for d in map(json.loads, codec_keys)]
    store = MemoryStore()
    zarr.create_array(
        store,
        shape=(1,) * ndim,
        chunks=(1,) * ndim if ndim else "auto",
        dtype=str if dtype == "str" else dtype,
        fill_value="" if dtype == "str" else 0,
        compressors=codecs,
        zarr_format=3,
    )
    raw = sync(store.get("zarr.json", prototype=default_buffer_prototype()))
    return json.loads(raw.to_bytes())


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2).encode()
