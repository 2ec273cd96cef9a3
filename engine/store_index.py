"""The result store's index: a status table that answers resume and inspect, and a search table
(keys, descriptions, embeddings) that search reads, updated per run by appending rows.

:class:`StoreIndex` is a collaborator the store holds (``ResultStore.indexing``); it uses the
store's node access (``root``, ``series_attrs``, ``iter_series``, the raw listing and reads), its
lock's record and its damage checks, and keeps the rows the store's writes owe the index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .enums import ROW_STATUSES
from .errors import StoreError
from .faults import killpoint
from .zarr_nodes import WRITE_ALL, NodeUnreadable, now, store_codecs, write_array
from .zarr_text import TEXT_ATTR, encode_text, read_text

if TYPE_CHECKING:
    from .store import OutputArray, ResultStore

INDEX_FORMAT = 4  # 3: status table (index/series), appended rows (index/delta), key hashes; 4: text as UTF-8 uint8
DELTA_CHUNK = 1024  # rows per chunk of appended index rows: an append rewrites at most one chunk
SMALL_INDEX = 4096  # an index this small is rewritten whole on update (cheap, and stays one chunk)
STRING_ROWS = 1024  # rows per chunk of the index's string columns
# widths (UTF-8 bytes) of appended text columns: keys are at most 128 characters, UIDs 64, and a
# DICOM description 64 characters; a longer value makes the next update rewrite the index whole
DELTA_TEXT_WIDTH = {"series_key": 128, "study_uid": 128, "description": 256}
COMPACT_FRACTION = 8  # appended rows past 1/8 of the compacted ones: rewrite whole


class StoreIndex:
    """index/ of a result store, a collaborator the store holds (``ResultStore.indexing``)."""

    def __init__(self, store: ResultStore):
        self.store = store
        self.skipped: list[str] = []  # series left out of search by the last index write
        self.owed: dict[str, _Row] = {}  # index rows owed by this store object's writes: key -> row

    # ---- index ------------------------------------------------------------------------------
    # index/ holds two tables. The search table (series_key, study_uid, description, key_hash,
    # embedding: complete series, sorted by key, one chunk per column) is what readers and
    # search use; index/series/ is the status table (one row per series group of any status,
    # sorted by key hash: key, status, head fingerprints) that resume and inspect answer from.
    # Between compactions, rows written by later runs are appended to index/delta/ (chunks of
    # DELTA_CHUNK rows, so an append rewrites at most one partial chunk); a delta row
    # supersedes earlier rows of the same key. Small indexes are rewritten whole instead.
    def rebuild_index(self, embedding_source: str | None = None) -> int:
        """Rewrite index/ from every series group: status rows for all, search rows for the
        complete ones with (if any series has one) an embedding.

        The group is written with attrs ``complete: false`` and flipped to true last, so a crash
        mid-rebuild leaves an index that validate reports and the next run rebuilds. A series
        whose embedding cannot be read is left out of search and listed in ``index_skipped``.
        The embedding matrix is one chunk (raw float32 then a 4-byte crc32c) so readers can
        memory-map it.
        """
        rows: dict[str, _Row] = {}
        skipped: list[str] = []
        source = embedding_source
        for key, attrs in self.store.iter_series():
            row = _row_from_attrs(attrs)
            rows[key] = row
            if row.status != "complete":
                continue
            try:
                group = self.store.root["series"][key]
                source = source or _first_embedding(group)
                row.embedding = _read_embedding(group, source) if source else None
            except Exception as exc:
                skipped.append(f"series/{key}: {type(exc).__name__}: {exc}")
                continue
            row.searchable = True
        if source:  # a search row must have an embedding when the index has them
            for row in rows.values():
                row.searchable = row.searchable and row.embedding is not None
        self.skipped = skipped
        self.owed = {}
        return self._write_index(rows, source, skipped)

    def update_index(self) -> int:
        """Bring index/ up to date with the series written through this store object: their rows
        are appended (or the index rewritten whole while it is small or its appended part has
        grown past an eighth of it), so the cost follows the rows written, not the store's size.
        Rebuilds from the groups (:meth:`rebuild_index`) when the index is absent, incomplete,
        damaged, of an older layout, stale (a run since its last update ended without updating
        it), or when new rows bring embeddings an index without them cannot hold. Returns the
        number of searchable rows."""
        touched, self.owed = self.owed, {}
        attrs = self.index_attrs()
        if attrs is None and self._holds_only(touched):
            # a store this object filled: every row is in memory, no group needs reading back
            source = min((s for row in touched.values() for s in row.embeddings), key=_source_order, default=None)
            skipped: list[str] = []
            self._resolve_embeddings(touched, source, skipped)
            self.skipped = skipped
            return self._write_index(dict(touched), source, skipped)
        if self._index_unusable(attrs) or not attrs.get("base_rows"):
            return self.rebuild_index()
        source = attrs.get("embedding_source")
        if source is None and any(row.embeddings for row in touched.values()):
            return self.rebuild_index()
        skipped = [s for s in attrs.get("skipped") or [] if s.split(":")[0].removeprefix("series/") not in touched]
        self._resolve_embeddings(touched, source, skipped)
        self.skipped = skipped
        base, delta = int(attrs.get("base_rows") or 0), int(attrs.get("delta_rows") or 0)
        try:
            if base + delta + len(touched) <= SMALL_INDEX or (delta + len(touched)) * COMPACT_FRACTION > base:
                rows = self._index_table(attrs)
                rows.update(touched)
                return self._write_index(rows, source, skipped)
            return self._append_delta(touched, attrs, source, skipped)
        except Exception:  # unreadable although its checksums passed: start again from the groups
            return self.rebuild_index()

    def _holds_only(self, touched: dict[str, "_Row"]) -> bool:
        """The store holds only this object's run, and its series groups are exactly those this
        object wrote, each with a known status (so nothing older could hide in a group)."""
        if not touched or any(row.status not in ROW_STATUSES[1:] for row in touched.values()):
            return False
        mine = (self.store.locking.held or {}).get("run_id")
        if mine is None or any(run != mine for run in self.store.root.attrs.get("runs") or []):
            return False
        return set(self.store._list_dir("series")) - {"zarr.json"} == set(touched)

    def compact_index(self) -> dict[str, int]:
        """Rewrite index/ as one chunk per column, folding in appended rows and dropping
        superseded ones (a stale or damaged index is rebuilt from the groups instead)."""
        attrs = self.index_attrs()
        before = {
            "base_rows": int((attrs or {}).get("base_rows") or 0),
            "delta_rows": int((attrs or {}).get("delta_rows") or 0),
        }
        if self._index_unusable(attrs):
            count = self.rebuild_index()
            return {**before, "rebuilt": 1, "rows": int(self.index_attrs().get("base_rows") or 0), "searchable": count}
        rows = self._index_table(attrs)
        count = self._write_index(rows, attrs.get("embedding_source"), list(attrs.get("skipped") or []))
        return {**before, "rebuilt": 0, "rows": len(rows), "searchable": count}

    def _index_unusable(self, attrs: dict[str, Any] | None) -> bool:
        return (
            not attrs
            or "damaged" in attrs
            or not attrs.get("complete")
            or attrs.get("format") != INDEX_FORMAT
            or not self._index_fresh(attrs)
            or bool(self.store.check_tree("index"))
        )

    def _index_fresh(self, attrs: dict[str, Any]) -> bool:
        """Every run recorded since the index was last written is this object's own (whose
        writes it tracks): a run that ended without updating the index leaves it stale."""
        runs = list(self.store.root.attrs.get("runs") or [])
        seen = attrs.get("runs_seen")
        if not isinstance(seen, int) or seen > len(runs):
            return False
        mine = (self.store.locking.held or {}).get("run_id")
        return all(run == mine for run in runs[seen:])

    def _resolve_embeddings(self, touched: dict[str, "_Row"], source: str | None, skipped: list[str]) -> None:
        for key, row in touched.items():
            row.searchable = row.status == "complete"
            if not source or not row.searchable:
                continue
            try:
                emb = row.embeddings.get(source)
                row.embedding = (
                    _read_embedding(self.store.root["series"][key], source)
                    if emb is None
                    else np.asarray(emb, dtype=np.float32)
                )
            except Exception as exc:
                skipped.append(f"series/{key}: {type(exc).__name__}: {exc}")
                row.embedding = None
            row.searchable = row.embedding is not None

    def _write_index(self, rows: dict[str, "_Row"], source: str | None, skipped: list[str]) -> int:
        index = self._fresh_index()
        keys = sorted(rows)
        search = [k for k in keys if rows[k].searchable]
        # strings in chunks of STRING_ROWS: naming the top hits decodes a few chunks, not 10^5 strings
        # text as zero-padded UTF-8 in uint8 (engine.zarr_text): a core data type every Zarr v3 reader decodes
        write_array(index, "series_key", encode_text(search), dict(TEXT_ATTR), chunk_rows=STRING_ROWS)
        killpoint("index-rebuild")
        write_array(
            index, "study_uid", encode_text([rows[k].study for k in search]), dict(TEXT_ATTR), chunk_rows=STRING_ROWS
        )
        write_array(
            index,
            "description",
            encode_text([rows[k].description for k in search]),
            dict(TEXT_ATTR),
            chunk_rows=STRING_ROWS,
        )
        write_array(index, "key_hash", key_hashes(search))
        embeddings = [rows[k].embedding for k in search] if source else []
        if embeddings:
            matrix = np.stack(embeddings).astype("<f4")
            a = index.create_array(
                "embedding",
                shape=matrix.shape,
                chunks=matrix.shape,
                dtype="<f4",
                compressors=store_codecs(compress=False),
                fill_value=0.0,
                config=WRITE_ALL,
            )
            a[...] = matrix
        head_sets: list[dict[str, Any]] = []
        hashes = key_hashes(keys)
        order = np.argsort(hashes, kind="stable")
        table = index.create_group("series")
        write_array(table, "series_key", encode_text([keys[i] for i in order]), dict(TEXT_ATTR))
        write_array(table, "key_hash", hashes[order])
        write_array(
            table, "status", np.asarray([ROW_STATUSES.index(rows[keys[i]].status) for i in order], dtype=np.uint8)
        )
        write_array(
            table, "heads", np.asarray([_head_set_id(head_sets, rows[keys[i]].heads) for i in order], dtype=np.int32)
        )
        index.update_attributes(
            {
                "count": len(search),
                "embedding_source": source if embeddings else None,
                "built": now(),
                "skipped": skipped[:100],
                "format": INDEX_FORMAT,
                "statuses": list(ROW_STATUSES),
                "head_sets": head_sets,
                "base_rows": len(keys),
                "delta_rows": 0,
                "runs_seen": len(self.store.root.attrs.get("runs") or []),
                "complete": True,
            }
        )
        return len(search)

    def _append_delta(
        self, touched: dict[str, "_Row"], attrs: dict[str, Any], source: str | None, skipped: list[str]
    ) -> int:
        index: zarr.Group = self.store.root["index"]  # zarr types an item as any node or scalar
        view = IndexView(self.store, attrs)
        count = (
            int(attrs.get("count") or 0)
            - sum(view.searchable(k) for k in touched)
            + sum(r.searchable for r in touched.values())
        )
        head_sets = list(attrs.get("head_sets") or [])
        keys = sorted(touched)
        rows = [touched[k] for k in keys]
        columns: dict[str, Any] = {
            "series_key": keys,
            "key_hash": key_hashes(keys),
            "status": np.asarray([ROW_STATUSES.index(r.status) for r in rows], dtype=np.uint8),
            "heads": np.asarray([_head_set_id(head_sets, r.heads) for r in rows], dtype=np.int32),
            "searchable": np.asarray([r.searchable for r in rows], dtype=np.uint8),
            "study_uid": [r.study for r in rows],
            "description": [r.description for r in rows],
        }
        if source:
            dim = int(index["embedding"].shape[1])
            columns["embedding"] = np.stack(
                [r.embedding if r.searchable else np.zeros(dim, np.float32) for r in rows]
            ).astype("<f4")
        index.update_attributes({"complete": False})  # a crash mid-append leaves an index the next run rebuilds
        delta: zarr.Group = index["delta"] if "delta" in index else index.create_group("delta")
        n, m = int(attrs.get("delta_rows") or 0), len(keys)
        for name, values in columns.items():
            if name in DELTA_TEXT_WIDTH:  # fixed width; a longer value raises and the caller rewrites the index
                width = (
                    int(delta[name].shape[1])
                    if name in delta and len(delta[name].shape) == 2
                    else DELTA_TEXT_WIDTH[name]
                )
                values = encode_text(values, width)
            else:
                values = np.asarray(values)
            arr = delta[name] if name in delta else _appendable(delta, name, values)
            arr.resize((n + m, *values.shape[1:]))
            arr[n : n + m] = values
        index.update_attributes(
            {
                "count": count,
                "skipped": skipped[:100],
                "head_sets": head_sets,
                "delta_rows": n + m,
                "updated": now(),
                "runs_seen": len(self.store.root.attrs.get("runs") or []),
                "complete": True,
            }
        )
        return count

    def _index_table(self, attrs: dict[str, Any]) -> dict[str, "_Row"]:
        """Every row of the index (search and status tables, appended rows applied in order)."""
        index = self.store.root["index"]
        head_sets = attrs.get("head_sets") or []
        table = index["series"]
        rows = {
            str(k): _Row(ROW_STATUSES[int(s)], heads=dict(head_sets[int(h)]))
            for k, s, h in zip(read_text(table["series_key"]), table["status"][...], table["heads"][...])
        }
        columns = [[str(v) for v in read_text(index[name])] for name in ("series_key", "study_uid", "description")]
        matrix = np.asarray(index["embedding"][...], dtype=np.float32) if attrs.get("embedding_source") else None
        if len({len(c) for c in columns}) != 1 or (matrix is not None and len(matrix) != len(columns[0])):
            raise StoreError("index columns of different lengths")  # a damaged or tampered index
        for i, (key, study, description) in enumerate(zip(*columns)):
            row = rows.setdefault(key, _Row("complete"))
            row.study, row.description, row.searchable = study, description, True
            row.embedding = matrix[i] if matrix is not None else None
        n = int(attrs.get("delta_rows") or 0)
        if n:
            delta = index["delta"]
            cols = {
                name: read_text(delta[name], slice(0, n)) if name in DELTA_TEXT_WIDTH else delta[name][:n]
                for name in delta.array_keys()
            }
            for i in range(n):
                rows[str(cols["series_key"][i])] = _Row(
                    ROW_STATUSES[int(cols["status"][i])],
                    str(cols["study_uid"][i]),
                    str(cols["description"][i]),
                    dict(head_sets[int(cols["heads"][i])]),
                    searchable=bool(cols["searchable"][i]),
                    embedding=np.asarray(cols["embedding"][i], np.float32) if "embedding" in cols else None,
                )
        return rows

    def index_view(self) -> "IndexView | None":
        """The index's status table, when it can answer for every series group: present, of
        this layout, complete and not stale. None means: ask the groups."""
        attrs = self.index_attrs()
        if not attrs or "damaged" in attrs or not attrs.get("complete") or attrs.get("format") != INDEX_FORMAT:
            return None
        if not self._index_fresh(attrs):
            return None
        try:
            return IndexView(self.store, attrs)
        except Exception:
            return None

    def triage(self, keys: list[str], head_fingerprints: dict[str, str], verify: str = "deep") -> dict[str, set[str]]:
        """Heads still to run per series key (see :meth:`pending_heads`), answered from the
        index's status table where it can.

        A key the index does not list has no group: every head is pending, no group is read.
        ``verify``: ``index`` trusts the index rows of stored series; ``shallow`` / ``deep``
        also check their groups (metadata and chunk listing; ``deep`` adds every chunk's
        checksum), so that damage found since is redone. Without a usable index (absent,
        stale after a crash, damaged) every key is answered from its group.
        """
        if verify not in ("index", "shallow", "deep"):
            raise ValueError(f"verify is index, shallow or deep, not {verify!r}")
        view = self.index_view()
        known = view.lookup(keys) if view is not None else {}
        out: dict[str, set[str]] = {}
        for key in keys:
            row = known.get(key)
            if view is None or key in self.owed or (row is not None and row[0] == "unknown"):
                out[key] = self.store.pending_heads(key, head_fingerprints, deep=verify == "deep")
            elif row is None or row[0] not in ("complete", "failed"):
                out[key] = set(head_fingerprints)
            elif verify == "index":
                out[key] = {h for h, fp in head_fingerprints.items() if row[1].get(h) != fp}
            else:
                out[key] = self.store.pending_heads(key, head_fingerprints, deep=verify == "deep")
        return out

    def note_series(self, keys: list[str]) -> None:
        """Owe index rows for series groups written by other store objects (other processes, Ray
        workers): their attributes are read back, so the next :meth:`update_index` stays
        incremental (cost: the groups named, not the store)."""
        for key in keys:
            attrs = self.store.series_attrs(key)
            self.owed[key] = _Row("unknown") if attrs is None else _row_from_attrs(attrs)

    def note_write(self, key: str, attrs: dict[str, Any], status: str, outputs: list[OutputArray]) -> None:
        """What this write owes index/: the series' row, with the embeddings just written, so
        the index update reads nothing back."""
        row = _row_from_attrs({**attrs, "status": status})
        row.embeddings = {f"{o.head}/{o.decl['name']}": o.value for o in outputs if o.decl.get("kind") == "embedding"}
        self.owed[key] = row

    def note_unknown(self, key: str) -> None:
        """A write of ``key`` failed: its group may hold anything now, so resume asks the group."""
        self.owed[key] = _Row("unknown")

    def _fresh_index(self) -> zarr.Group:
        """An empty index group marked incomplete; the old one is marked incomplete before deletion."""
        try:
            self.store.root["index"].update_attributes({"complete": False})
        except Exception:
            pass  # absent or unreadable: deleted below either way
        self.store._delete_prefix("index")
        index = self.store.root.create_group("index")
        index.update_attributes({"count": 0, "embedding_source": None, "complete": False})
        return index

    def index_attrs(self) -> dict[str, Any] | None:
        """index/ attributes; None when absent; {'damaged': reason} when unreadable."""
        try:
            return dict(self.store._node_meta("index").get("attributes") or {})
        except NodeUnreadable as exc:
            if str(exc).endswith(": missing") and not self.store._list_dir("index"):
                return None
            return {"damaged": str(exc)}


@dataclass
class _Row:
    """One series as the index records it."""

    status: str
    study: str = ""
    description: str = ""
    heads: dict[str, Any] = field(default_factory=dict)  # head -> fingerprint (None when it failed)
    searchable: bool = False
    embedding: np.ndarray | None = None
    embeddings: dict[str, Any] = field(default_factory=dict)  # just written: output path -> vector


def _row_from_attrs(attrs: dict[str, Any]) -> _Row:
    status = attrs.get("status")
    heads = {
        h: (None if not isinstance(r, dict) or r.get("error") else r.get("fingerprint"))
        for h, r in (attrs.get("heads") or {}).items()
    }
    return _Row(
        status if status in ROW_STATUSES else "unknown",
        str(attrs.get("study_uid", "")),
        str(attrs.get("description", "")),
        heads,
    )


def _head_set_id(head_sets: list[dict[str, Any]], heads: dict[str, Any]) -> int:
    """Head fingerprints are shared by most series: rows hold an id into a short list."""
    try:
        return head_sets.index(heads)
    except ValueError:
        head_sets.append(dict(heads))
        return len(head_sets) - 1


def key_hashes(keys: list[str]) -> np.ndarray:
    """64-bit BLAKE2b of each series key: what the index looks keys up by."""
    return np.asarray(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys], dtype="<u8"
    ).reshape(len(keys))


def _appendable(group: zarr.Group, name: str, values: np.ndarray) -> zarr.Array:
    text = name in DELTA_TEXT_WIDTH
    return group.create_array(
        name,
        shape=(0, *values.shape[1:]),
        chunks=(DELTA_CHUNK, *values.shape[1:]),
        dtype=values.dtype,
        fill_value=0,
        compressors=store_codecs(text),
        config=WRITE_ALL,
        attributes=dict(TEXT_ATTR) if text else None,
    )


class IndexView:
    """The status table of index/ (plus appended rows), read once: a few numeric columns, so
    looking keys up costs the same at 1,000 series as at 100,000."""

    def __init__(self, store: ResultStore, attrs: dict[str, Any]):
        index = store.root["index"]
        self.head_sets = attrs.get("head_sets") or []
        table = index["series"]
        self.hash, self.status, self.heads = (table[name][...] for name in ("key_hash", "status", "heads"))
        self.search_hash = index["key_hash"][...]
        n = int(attrs.get("delta_rows") or 0)
        self.delta: dict[int, tuple[int, int, bool]] = {}
        if n:
            delta = index["delta"]
            cols = [delta[name][:n] for name in ("key_hash", "status", "heads", "searchable")]
            for h, s, hd, sr in zip(*(c.tolist() for c in cols)):
                self.delta[h] = (s, hd, bool(sr))  # later rows win

    def _base_rows(self, hashes: np.ndarray) -> np.ndarray:
        j = np.searchsorted(self.hash, hashes).clip(0, max(len(self.hash) - 1, 0))
        found = (self.hash[j] == hashes) if len(self.hash) else np.zeros(len(hashes), bool)
        return np.where(found, j, -1)

    def lookup(self, keys: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """(status, head fingerprints) of each key the index lists."""
        hashes = key_hashes(list(keys))
        out = {}
        for key, h, j in zip(keys, hashes.tolist(), self._base_rows(hashes).tolist()):
            if h in self.delta:
                s, hd, _ = self.delta[h]
            elif j >= 0:
                s, hd = int(self.status[j]), int(self.heads[j])
            else:
                continue
            out[key] = (ROW_STATUSES[s], self.head_sets[hd])
        return out

    def searchable(self, key: str) -> bool:
        h = int(key_hashes([key])[0])
        if h in self.delta:
            return self.delta[h][2]
        return bool((self.search_hash == h).any())

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Series by status and by head, every series counted once."""
        live = ~np.isin(self.hash, np.fromiter(self.delta, dtype="<u8", count=len(self.delta)))
        status = np.bincount(self.status[live], minlength=len(ROW_STATUSES))
        sets = np.bincount(self.heads[live], minlength=len(self.head_sets))
        for s, hd, _ in self.delta.values():
            status[s] += 1
            sets[hd] += 1
        by_status = {ROW_STATUSES[i]: int(c) for i, c in enumerate(status) if c}
        heads: dict[str, int] = {}
        for i, c in enumerate(sets):
            for h in self.head_sets[i] if c else ():
                heads[h] = heads.get(h, 0) + int(c)
        return by_status, heads

    def rows(self) -> int:
        """Series listed, each once."""
        appended = np.fromiter(self.delta, dtype="<u8", count=len(self.delta))
        return len(self.hash) + int((self._base_rows(appended) < 0).sum())


def _source_order(source: str) -> tuple[bool, str]:
    """Which embedding the index uses when a series has several: retrieve's first, then by name."""
    return (source.split("/")[0] != "retrieve", source)


def _first_embedding(series_group: zarr.Group) -> str | None:
    heads = sorted(series_group.groups(), key=lambda kv: (kv[0] != "retrieve", kv[0]))
    for head, g in heads:
        for name, arr in g.arrays():
            if arr.attrs.get("kind") == "embedding":
                return f"{head}/{name}"
    return None


def _read_embedding(series_group: zarr.Group, source: str) -> np.ndarray | None:
    head, output = source.split("/")
    try:
        node = series_group[head][output]
    except KeyError:
        return None
    return np.asarray(node[...], dtype=np.float32)
