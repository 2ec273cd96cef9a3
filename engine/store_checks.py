"""Damage detection for the result store: every node under a series or a tree has readable
metadata and every chunk that metadata implies; ``deep`` also verifies each chunk's crc32c.

Kept apart from :mod:`engine.store` because it only reads: :class:`StoreChecks`, a collaborator
the store holds (``ResultStore.checks``), uses the store's raw access (``root``, ``_get``,
``_get_head``, ``_list_prefix``) and ``series_attrs``, and writes nothing.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .store_bounds import MAX_META_BYTES, array_problem, parse_metadata
from .zarr_nodes import NodeUnreadable

if TYPE_CHECKING:
    from .store import ResultStore

DAMAGED = "damaged"  # reported for an unreadable series group, never written
MAX_LISTED = 3  # missing chunks named one by one per array; more are counted


class StoreChecks:
    """Damage checks of a result store, a collaborator the store holds (``ResultStore.checks``)."""

    def __init__(self, store: ResultStore):
        self.store = store

    # ---- damage checks ------------------------------------------------------------------------
    def check_series(self, key: str, deep: bool = False) -> list[str]:
        """Problems that make a series' stored outputs untrustworthy, as 'path: message'.

        Cheap: every node's metadata parses, every declared output exists, every chunk exists
        (one listing). ``deep`` also reads every chunk and verifies its crc32c.
        """
        attrs = self.store.series_attrs(key)
        if attrs is None:
            return [f"series/{key}: missing"]
        if attrs.get("status") == DAMAGED:
            return [attrs["reason"]]
        node = f"series/{key}"
        problems, nodes = self._check_tree(node, deep)
        for head, info in (attrs.get("heads") or {}).items():
            if not isinstance(info, dict) or info.get("error"):
                continue
            for output in info.get("outputs") or []:
                for path in (f"{node}/{head}", f"{node}/{head}/{output}"):
                    if path not in nodes:
                        problems.append(f"{node}/{head}/{output}: declared output missing")
                        break
        return problems

    def check_tree(self, node: str, deep: bool = False) -> list[str]:
        """Problems of every node under ``node`` (e.g. 'index'): metadata, chunks, checksums."""
        return self._check_tree(node, deep)[0]

    def _check_tree(self, node: str, deep: bool) -> tuple[list[str], set[str]]:
        keys = self.store._list_prefix(node + "/")
        problems: list[str] = []
        readable: set[str] = set()
        metas = sorted(k[: -len("/zarr.json")] for k in keys if k.endswith("/zarr.json"))
        for path in metas:
            try:
                meta = _parse_meta(
                    f"{path}/zarr.json", self.store._get_head(f"{path}/zarr.json", MAX_META_BYTES + 1) or b""
                )
            except NodeUnreadable as exc:
                problems.append(str(exc))
                continue
            readable.add(path)
            if meta.get("node_type") == "array":
                problems += self._check_chunks(path, meta, keys, deep)
        return problems, readable

    def _check_chunks(self, path: str, meta: dict[str, Any], keys: set[str], deep: bool) -> list[str]:
        unbelievable = array_problem(path, meta)  # before the chunk grid is enumerated
        if unbelievable:
            return [unbelievable]
        try:
            expected = _chunk_keys(path, meta)
        except Exception as exc:
            return [f"{path}/zarr.json: array metadata not understood ({exc})"]
        missing = sorted(expected - keys)
        problems = [f"{k}: chunk missing" for k in missing[:MAX_LISTED]]
        if len(missing) > MAX_LISTED:
            problems.append(f"{path}: {len(missing)} of {len(expected)} chunks missing")
        if deep:
            problems += self._verify_chunks(path, meta, sorted(expected & keys))
        return problems

    def _verify_chunks(self, path: str, meta: dict[str, Any], chunk_keys: list[str]) -> list[str]:
        """crc32c of each chunk's stored bytes; arrays written without it are decoded instead."""
        codecs = meta.get("codecs") or []
        if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed" and _shard_checksummed(codecs[0]):
            problems = []
            for key in chunk_keys:
                why = _shard_problem(self.store._get(key) or b"", meta)
                if why:
                    problems.append(f"{key}: {why}")
            return problems
        if not codecs or codecs[-1].get("name") != "crc32c":
            try:
                zarr.open_array(store=self.store.root.store, path=path, mode="r")[...]
            except Exception as exc:
                return [f"{path}: unreadable ({type(exc).__name__}: {exc})"]
            return []
        import google_crc32c  # only checks that read chunk bytes need it

        problems = []
        for key in chunk_keys:
            raw = self.store._get(key) or b""
            if len(raw) < 4 or google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
                problems.append(f"{key}: checksum mismatch (the chunk's bytes are damaged)")
        return problems


def _parse_meta(key: str, raw: bytes) -> dict[str, Any]:
    """A node's metadata, within the limits of :mod:`engine.store_bounds` (raises NodeUnreadable)."""
    return parse_metadata(key, raw)


def _chunk_keys(path: str, meta: dict[str, Any]) -> set[str]:
    """Every chunk key an array's metadata implies (arrays are written whole)."""
    from zarr.core.metadata.v3 import ArrayV3Metadata  # only checks that read chunk bytes need it

    md = ArrayV3Metadata.from_dict(dict(meta))
    shape, chunks = md.shape, md.chunk_grid.chunk_shape
    if 0 in shape:
        return set()
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunks)]
    return {f"{path}/{md.encode_chunk_key(coords)}" for coords in itertools.product(*grid)}


def _shard_checksummed(codec: dict[str, Any]) -> bool:
    """A shard whose inner chunks and index each end with a crc32c (how this store writes masks)."""
    conf = codec.get("configuration") or {}
    return all((conf.get(part) or [{}])[-1].get("name") == "crc32c" for part in ("codecs", "index_codecs"))


def _shard_problem(raw: bytes, meta: dict[str, Any]) -> str | None:
    """Why a shard's stored bytes are damaged, or None: its index is (offset, nbytes) uint64
    pairs, one per inner chunk, then its own crc32c; each inner chunk ends with its crc32c."""
    import google_crc32c  # only checks that read chunk bytes need it

    def damaged(blob: bytes) -> bool:
        return len(blob) < 4 or google_crc32c.value(blob[:-4]).to_bytes(4, "little") != blob[-4:]

    conf = meta["codecs"][0]["configuration"]
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    n = math.prod(s // c for s, c in zip(shard, conf["chunk_shape"]))
    size = 16 * n + 4
    index = raw[:size] if conf.get("index_location", "end") == "start" else raw[-size:]
    if len(raw) < size or damaged(index):
        return "checksum mismatch (the shard's index is damaged)"
    pairs = np.frombuffer(index[:-4], dtype="<u8").reshape(n, 2)
    for offset, nbytes in pairs:
        if offset == np.iinfo(np.uint64).max:  # an empty inner chunk: nothing stored
            continue
        if offset + nbytes > len(raw) or damaged(raw[int(offset) : int(offset + nbytes)]):
            return "checksum mismatch (the chunk's bytes are damaged)"
    return None
