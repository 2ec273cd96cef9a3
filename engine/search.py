"""Search a result store's index: free text, a report, or another series -> ranked series.

Scores are cosine similarities in the model's joint image-text space, computed against
``index/embedding`` without re-encoding any image. That matrix is stored as one uncompressed
chunk, so a local store's is memory-mapped and scored with one matrix-vector product; 100k series
take milliseconds. Rows appended since the index was last compacted (``index/delta``) are ranked
beside it and hide the older rows of their series. Stores on object storage are read through zarr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from .bounded_read import read_text_file
from .errors import StoreError, UsageError
from .store_bounds import MAX_META_BYTES, parse_metadata
from .user_text import utf8_text
from .zarr_nodes import NodeUnreadable
from .zarr_text import decode_text, is_text, read_text

INDEX = "index"


@dataclass(frozen=True)
class Hit:
    """One ranked series."""

    series_key: str
    score: float
    study_uid: str
    description: str


def rank(
    embeddings: np.ndarray, query: np.ndarray, k: int, exclude: int | Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``embeddings`` (N, E) by cosine similarity with ``query`` (E,).

    Rows are expected to be unit vectors (the index stores them so); the query is normalised
    here. Rows in ``exclude`` and rows with non-finite scores are never returned. Returns
    (row indices, scores), best first; equal scores are ordered by row index; fewer than ``k``
    when fewer rows qualify.
    """
    emb = np.asarray(embeddings)
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if emb.ndim != 2 or emb.shape[1] != q.size:
        raise UsageError(f"query has {q.size} dimensions, the index embeddings are {emb.shape}")
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0.0:
        raise UsageError("the query embedding is zero or not finite")
    scores = np.asarray(emb @ (q / norm), dtype=np.float32)
    valid = np.isfinite(scores)
    if exclude is not None:
        valid[np.asarray(exclude, dtype=np.int64).reshape(-1)] = False
    k = min(int(k), int(valid.sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    masked = np.where(valid, scores, -np.inf)
    top = np.argpartition(-masked, k - 1)[:k]
    # Everything tied with the k-th score joins the candidates, so ties resolve by row index
    # rather than by argpartition's arbitrary choice.
    candidates = np.flatnonzero(valid & (masked >= masked[top].min()))
    order = np.lexsort((candidates, -masked[candidates]))[:k]
    idx = candidates[order]
    return idx, scores[idx]


def search(
    store_path: str | Path,
    *,
    text: str | None = None,
    like: str | None = None,
    report: str | Path | None = None,
    k: int = 10,
    model: Any = None,
) -> list[Hit]:
    """Rank the store's series against exactly one of: ``text`` (free text), ``like`` (a series
    key: scan-to-scan, the series itself excluded) or ``report`` (a text file's contents).

    Text is encoded by the model that embedded the store (root attribute ``model``) unless
    ``model`` (a loaded model or a model folder) is given; a model whose fingerprint differs from
    the store's is refused, since its embeddings would not be comparable.
    """
    given = [name for name, value in (("text", text), ("like", like), ("report", report)) if value is not None]
    if len(given) != 1:
        raise UsageError(f"give exactly one of text, like or report (got {', '.join(given) or 'none'})")
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    text = None if text is None else utf8_text(text, "search text")
    like = None if like is None else utf8_text(like, "like")
    # a regular file under a size cap, read before anything else is opened
    report_text = read_text_file(report, what="report").strip() if report is not None else None
    store = _open_store(store_path)
    root = store.root
    index = root[INDEX]
    if "embedding" not in index:
        raise UsageError(f"{store_path}: the index holds no embeddings; run the 'retrieve' head to add them")
    for column in ("embedding", "key_hash", "series_key"):
        _check_declared(store, f"{INDEX}/{column}")
    embeddings = index_embeddings(store_path, index["embedding"])
    appended = _Appended.read(index)
    base_exclude = appended.superseded(index)

    if like is not None:
        query, exclude, appended_exclude = _like_query(index, embeddings, appended, like, store_path)
        base_exclude = np.union1d(base_exclude, exclude)
    else:
        appended_exclude = None
        if report is not None:
            query_text = report_text
            if not query_text:
                raise UsageError(f"report {report} is empty")
        else:
            query_text = str(text).strip()
            if not query_text:
                raise UsageError("the text query is empty")
        query = encode_query(query_text, root.attrs.get("model") or {}, model)

    idx, scores = rank(embeddings, query, k, exclude=base_exclude)
    hits = [(float(s), 0, i) for i, s in zip(idx.tolist(), scores.tolist())]
    if appended.keys:
        d_idx, d_scores = rank(appended.embedding, query, k, exclude=appended_exclude)
        hits += [(float(s), 1, i) for i, s in zip(d_idx.tolist(), d_scores.tolist())]
    hits = sorted(hits, key=lambda h: (-h[0], h[1], h[2]))[:k]
    base_rows = np.asarray([i for _, src, i in hits if src == 0], dtype=np.int64)
    columns = iter(list(zip(*(_rows(index, name, base_rows) for name in ("series_key", "study_uid", "description")))))
    out = []
    for score, src, i in hits:
        key, study, desc = next(columns) if src == 0 else appended.row(i)
        out.append(Hit(series_key=key, score=score, study_uid=study, description=desc))
    return out


def _like_query(
    index: zarr.Group, embeddings: np.ndarray, appended: "_Appended", like: str, store_path: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The query vector of series ``like`` and the rows (compacted, appended) that are it."""
    if like in appended.keys:
        i = appended.keys.index(like)
        return np.asarray(appended.embedding[i], np.float32), _base_rows_of(index, like), np.asarray([i])
    matches = _base_rows_of(index, like)
    if len(matches) == 0 or like in appended.dropped:
        raise UsageError(f"series {like!r} is not in the index of {store_path}")
    return np.asarray(embeddings[matches[0]], dtype=np.float32), matches, None


def _base_rows_of(index: zarr.Group, key: str) -> np.ndarray:
    if "key_hash" in index:
        from .store import key_hashes  # the store (zarr writer side) loads only when a store is searched

        return np.flatnonzero(index["key_hash"][...] == key_hashes([key])[0])
    return np.flatnonzero(read_text(index["series_key"]) == key)


class _Appended:
    """Index rows appended since the last compaction: the latest row per key; searchable ones
    carry their embedding, the others only hide older rows of their key."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.studies: list[str] = []
        self.descriptions: list[str] = []
        self.embedding = np.zeros((0, 0), np.float32)
        self.hashes = np.zeros(0, dtype="<u8")  # every appended key, searchable or not
        self.dropped: set[str] = set()

    @classmethod
    def read(cls, index: zarr.Group) -> "_Appended":
        out = cls()
        n = int(index.attrs.get("delta_rows") or 0)
        if not n or "delta" not in index:
            return out
        delta = index["delta"]
        cols = {
            name: read_text(delta[name], slice(0, n))
            if name in ("series_key", "study_uid", "description")
            else delta[name][:n]
            for name in ("series_key", "key_hash", "searchable", "study_uid", "description", "embedding")
        }
        latest: dict[str, int] = {}
        for i, key in enumerate(cols["series_key"].tolist()):
            latest[str(key)] = i
        rows = [i for i in latest.values() if cols["searchable"][i]]
        out.dropped = {k for k, i in latest.items() if not cols["searchable"][i]}
        out.keys = [str(cols["series_key"][i]) for i in rows]
        out.studies = [str(cols["study_uid"][i]) for i in rows]
        out.descriptions = [str(cols["description"][i]) for i in rows]
        out.embedding = np.asarray(cols["embedding"][rows], dtype=np.float32)
        out.hashes = np.unique(cols["key_hash"])
        return out

    def superseded(self, index: zarr.Group) -> np.ndarray:
        """Rows of the compacted table whose key has an appended row."""
        if not len(self.hashes) or "key_hash" not in index:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.isin(index["key_hash"][...], self.hashes))

    def row(self, i: int) -> tuple[str, str, str]:
        return self.keys[i], self.studies[i], self.descriptions[i]


def encode_query(text: str, store_model: dict[str, Any], model: Any = None) -> np.ndarray:
    """Encode ``text`` with the text tower of ``model`` (default: the store's model) -> (E,)."""
    wanted = store_model.get("fingerprint")
    if model is None or isinstance(model, (str, Path)):
        from .model import load_model  # the model loads only for text and report queries

        path = model if model is not None else store_model.get("path")
        if model is None and path is not None and not Path(path).is_dir():
            path = None  # the store moved machines: try the embedded default, checked below
        model = load_model(path)
    have = getattr(model, "fingerprint", None)
    if wanted and have and have != wanted:
        raise UsageError(
            f"the store was embedded by model {wanted[:19]}..., not {have[:19]}...; "
            "pass the model folder that wrote the store"
        )
    tower = model.text_tower()
    if tower is None:
        raise UsageError("the model has no text tower, so text and report search are unavailable")
    encoded = tower.encode([text])
    if hasattr(encoded, "detach"):
        encoded = encoded.detach().float().cpu().numpy()
    return np.asarray(encoded, dtype=np.float32).reshape(-1)


def index_embeddings(store_path: str | Path, array: zarr.Array) -> np.ndarray:
    """The (N, E) embedding matrix, memory-mapped when the store is local and the matrix is
    stored as one raw little-endian chunk; read through zarr (checksum verified) otherwise."""
    from .store import is_remote  # the store (zarr writer side) loads only when a store is searched

    if not is_remote(store_path):
        local = str(store_path).removeprefix("file://")
        mapped = _memmap_single_chunk(Path(local) / INDEX / "embedding", tuple(array.shape))
        if mapped is not None:
            return mapped
    return np.asarray(array[...], dtype=np.float32)


def _memmap_single_chunk(array_dir: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """np.memmap of the array's only chunk if its layout allows reading it raw; else None."""
    try:
        with open(array_dir / "zarr.json", "rb") as fh:  # bounded: a store is untrusted input
            meta = parse_metadata(f"{INDEX}/embedding", fh.read(MAX_META_BYTES + 1))
    except (OSError, NodeUnreadable):
        return None
    grid = meta.get("chunk_grid", {})
    encoding = meta.get("chunk_key_encoding", {})
    codecs = meta.get("codecs", [])
    raw = (
        meta.get("zarr_format") == 3
        and meta.get("data_type") == "float32"
        and len(shape) == 2
        and grid.get("name") == "regular"
        and tuple(grid.get("configuration", {}).get("chunk_shape", ())) == shape
        and not meta.get("storage_transformers")
        and 1 <= len(codecs) <= 2
        and codecs[0].get("name") == "bytes"
        and codecs[0].get("configuration", {}).get("endian", "little") == "little"
        and all(c.get("name") == "crc32c" for c in codecs[1:])
    )
    checksummed = len(codecs) == 2
    if not raw or 0 in shape:
        return None
    if encoding.get("name") == "default":
        sep = encoding.get("configuration", {}).get("separator", "/")
        chunk = array_dir / sep.join(["c", "0", "0"])
    elif encoding.get("name") == "v2":
        sep = encoding.get("configuration", {}).get("separator", ".")
        chunk = array_dir / sep.join(["0", "0"])
    else:
        return None
    nbytes = int(np.prod(shape)) * 4
    if not chunk.is_file() or chunk.stat().st_size != nbytes + 4 * checksummed:
        return None
    mapped = np.memmap(chunk, dtype="<f4", mode="r", shape=shape)
    if checksummed and not _crc32c_matches(chunk, nbytes):
        return None  # the zarr read that follows reports the damage
    return mapped


def _crc32c_matches(chunk: Path, nbytes: int) -> bool:
    """The chunk's CRC32C trailer (Zarr's crc32c codec: little-endian, after the data) matches.
    Search reads every row anyway, so verifying costs one more pass over page-cached bytes."""
    from numcodecs.checksum32 import crc32c_checksum  # only an unchecksummed index is read through numcodecs

    raw = np.memmap(chunk, dtype=np.uint8, mode="r")
    return int(crc32c_checksum(raw[:nbytes])) == int.from_bytes(bytes(raw[nbytes : nbytes + 4]), "little")


def _check_declared(store: Any, node: str) -> None:
    """Raise StoreError naming ``node`` when its declared shape is not believable (a tampered
    index must not make search allocate what its metadata claims)."""
    from .errors import StoreError
    from .store_bounds import array_problem
    from .zarr_nodes import NodeUnreadable

    try:
        meta = store._node_meta(node)
    except NodeUnreadable as exc:
        if str(exc).endswith(": missing"):
            return
        raise StoreError(f"{exc}; the next run rebuilds the index") from None
    if meta.get("node_type") != "array":
        return
    from zarr.core.sync import sync

    stored = sum(sync(store.root.store.getsize(k)) for k in store._list_prefix(f"{node}/c"))
    problem = array_problem(node, meta, stored_bytes=stored)
    if problem:
        raise StoreError(f"{problem}; the next run rebuilds the index")


def _open_store(store_path: str | Path) -> Any:
    """The store, read-only: a local path or any URL the store opens (s3://, gs://, ...)."""
    from .store import open_store  # the store (zarr writer side) loads only when a store is searched

    try:
        store = open_store(store_path, "r")
    except FileNotFoundError as exc:
        raise StoreError(str(exc)) from exc
    if INDEX not in store.root:
        raise StoreError(f"{store_path} has no index/ group; it is written at the end of a run")
    return store


def _rows(index: zarr.Group, name: str, idx: np.ndarray) -> list[str]:
    """Strings of column ``name`` at rows ``idx`` (empty strings when the column is absent)."""
    if name not in index or len(idx) == 0:
        return [""] * len(idx)
    rows = index[name].oindex[np.asarray(idx, dtype=np.int64)]
    return [str(v) for v in (decode_text(rows) if is_text(index[name]) else rows)]
