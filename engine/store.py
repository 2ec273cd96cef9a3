"""The result store: one Zarr v3 group per series, run provenance and a columnar index.

The store knows nothing of torch or of heads' code; it writes the numpy arrays and attributes the
pipeline hands it. Layout (see schemas/store.schema.json)::

    results.zarr/            attrs: mrfm {format_version, version}, runs [ids], model {...}
      runs/<run_id>          attrs: config, model, heads, backend, host, timings, counts
      series/<key>/          attrs: uids, source, geometry, status, reason, run_id, fingerprint
        <head>/<output>      mask | scores | value | embedding arrays; boxes are a group
      index/                 series_key, study_uid, description, embedding (one raw chunk)
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

FORMAT_VERSION = 1
STATUSES = ("incomplete", "complete", "failed", "skipped")
_KEY_RE = re.compile(r"[^A-Za-z0-9._-]")


def series_key(uid: str) -> str:
    """A group name derived from a SeriesInstanceUID (or any id), safe on every filesystem."""
    key = _KEY_RE.sub("_", uid.strip()) or "unnamed"
    return key[:128]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class OutputArray:
    """One head output ready to write: its declaration and its numpy value(s)."""

    head: str
    head_version: str
    decl: dict[str, Any]
    value: Any  # np.ndarray, or dict of arrays/lists for boxes


class ResultStore:
    """A Zarr v3 result store opened for reading or writing."""

    def __init__(self, path: str | Path, mode: str = "a"):
        from . import __version__

        self.path = Path(path)
        if mode == "r" and not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"{self.path} is not a Zarr v3 store (no zarr.json)")
        self.root = zarr.open_group(str(self.path), mode=mode, zarr_format=3)
        if mode != "r" and "mrfm" not in self.root.attrs:
            self.root.attrs.update({"mrfm": {"format_version": FORMAT_VERSION, "version": __version__, "created": now()}, "runs": []})
        if mode != "r":
            for name in ("runs", "series"):
                self.root.require_group(name)

    # ---- runs -------------------------------------------------------------------------------
    def begin_run(self, run_id: str, info: dict[str, Any]) -> None:
        self.root.require_group("runs").create_group(run_id).attrs.update({**info, "status": "running"})
        attrs = dict(self.root.attrs)
        self.root.attrs.update({"runs": [*attrs.get("runs", []), run_id], "model": info.get("model", {})})

    def finish_run(self, run_id: str, info: dict[str, Any]) -> None:
        self.root["runs"][run_id].attrs.update({**info, "status": "finished"})

    def runs(self) -> dict[str, dict[str, Any]]:
        if "runs" not in self.root:
            return {}
        return {name: dict(g.attrs) for name, g in self.root["runs"].groups()}

    # ---- series -----------------------------------------------------------------------------
    def series_attrs(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self.root["series"][key].attrs)
        except KeyError:
            return None

    def iter_series(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if "series" not in self.root:
            return
        for name, group in sorted(self.root["series"].groups()):
            yield name, dict(group.attrs)

    def pending_heads(self, key: str, head_fingerprints: dict[str, str]) -> set[str]:
        """Heads still to run on a series: missing, failed, or fit with another fingerprint.

        An empty set means resume may skip the series.
        """
        attrs = self.series_attrs(key)
        if not attrs or attrs.get("status") not in ("complete", "failed"):
            return set(head_fingerprints)
        done = attrs.get("heads", {})
        return {
            name for name, fp in head_fingerprints.items()
            if name not in done or done[name].get("error") or done[name].get("fingerprint") != fp
        }

    def write_series(self, key: str, attrs: dict[str, Any], outputs: list[OutputArray], status: str,
                     reason: str | None = None, replace: bool = False) -> None:
        """Write one series group; ``status`` goes in last, so a crash leaves 'incomplete'.

        Outputs of heads that this write does not touch are kept (adding a head to a store costs
        nothing already written), unless ``replace`` is set or the series' grid has changed.
        """
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        series = self.root.require_group("series")
        old = dict(series[key].attrs) if key in series else None
        new_heads = attrs.get("heads", {})
        same_grid = old is not None and ("geometry" not in attrs or old.get("geometry") == attrs["geometry"])
        if old is not None and same_grid and not replace:
            group = series[key]
            group.attrs.update({"status": "incomplete"})
            kept = {h: r for h, r in old.get("heads", {}).items() if h not in new_heads}
            for name in list(group.group_keys()):
                if name not in kept:
                    del group[name]
        else:
            if old is not None:
                del series[key]
            group = series.create_group(key)
            kept = {}
        heads = {**kept, **new_heads}
        # attrs.update merges: a kept group keeps its geometry when this write has none (load failed)
        group.attrs.update({**attrs, "heads": heads, "status": "incomplete", "reason": None})
        geometry = group.attrs.get("geometry") or {}
        shape = tuple(geometry.get("shape") or ())
        for out in outputs:
            self._write_output(group.require_group(out.head), out, shape, geometry)
        errors = [r["error"] for r in heads.values() if r.get("error")]
        if status == "complete" and errors:
            status, reason = "failed", "; ".join(errors)
        group.attrs.update({"status": status, "reason": reason, "written": now()})

    def _write_output(self, head_group: zarr.Group, out: OutputArray, shape: tuple[int, ...], geometry: dict[str, Any]) -> None:
        decl, name = out.decl, out.decl["name"]
        meta = {k: decl[k] for k in ("kind", "labels", "colors", "units", "range", "normalized", "description") if k in decl}
        meta.update({"head": out.head, "head_version": out.head_version})
        if decl["kind"] == "boxes":
            g = head_group.create_group(name)
            v = out.value
            n = len(v["scores"])
            _array(g, "world", np.asarray(v["world"], dtype=np.float64).reshape(n, 6))
            _array(g, "voxel", np.asarray(v["voxel"], dtype=np.float64).reshape(n, 6))
            _array(g, "scores", np.asarray(v["scores"], dtype=np.float32).reshape(n))
            for extra in ("labels", "queries"):
                if extra in v:
                    _array(g, extra, np.asarray(v[extra], dtype=str).reshape(n))
            g.attrs.update({**meta, "world_units": "mm (RAS+): x0, y0, z0, x1, y1, z1", "voxel_units": "native voxel indices: i0, j0, k0, i1, j1, k1"})
            return
        arr = np.asarray(out.value)
        if decl["kind"] == "mask":
            chunks = tuple(min(64, s) for s in arr.shape)
            a = head_group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks, compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0)
            a[...] = arr
            meta.update({"affine": geometry.get("affine"), "dtype": str(arr.dtype)})
            a.attrs.update(meta)
            return
        a = _array(head_group, name, arr.astype(decl["dtype"]))
        a.attrs.update(meta)

    def read_output(self, key: str, head: str, output: str) -> Any:
        """An output as numpy (a dict of arrays for boxes)."""
        node = self.root["series"][key][head][output]
        if isinstance(node, zarr.Group):
            return {name: arr[...] for name, arr in node.arrays()} | {"attrs": dict(node.attrs)}
        return node[...]

    # ---- index ------------------------------------------------------------------------------
    def rebuild_index(self, embedding_source: str | None = None) -> int:
        """Rewrite index/ from every complete series: keys, uids and (if present) embeddings.

        The embedding matrix is one uncompressed chunk so readers can memory-map it.
        """
        keys, studies, descriptions, embeddings, source = [], [], [], [], embedding_source
        for key, attrs in self.iter_series():
            if attrs.get("status") != "complete":
                continue
            if source is None:
                source = _first_embedding(self.root["series"][key])
            emb = None
            if source:
                head, output = source.split("/")
                try:
                    emb = np.asarray(self.root["series"][key][head][output][...], dtype=np.float32)
                except KeyError:
                    emb = None
            if source and emb is None:
                continue  # an index row must have an embedding when the index has them
            keys.append(key)
            studies.append(attrs.get("study_uid", ""))
            descriptions.append(attrs.get("description", ""))
            if emb is not None:
                embeddings.append(emb)
        if "index" in self.root:
            del self.root["index"]
        index = self.root.create_group("index")
        _array(index, "series_key", np.asarray(keys, dtype=str))
        _array(index, "study_uid", np.asarray(studies, dtype=str))
        _array(index, "description", np.asarray(descriptions, dtype=str))
        if embeddings:
            matrix = np.stack(embeddings).astype("<f4")
            a = index.create_array("embedding", shape=matrix.shape, chunks=matrix.shape, dtype="<f4", compressors=None, fill_value=0.0)
            a[...] = matrix
        index.attrs.update({"count": len(keys), "embedding_source": source if embeddings else None, "built": now()})
        return len(keys)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        heads: dict[str, int] = {}
        for _, attrs in self.iter_series():
            counts[attrs.get("status", "?")] = counts.get(attrs.get("status", "?"), 0) + 1
            for h in attrs.get("heads", {}):
                heads[h] = heads.get(h, 0) + 1
        root = dict(self.root.attrs)
        return {"path": str(self.path), "format": root.get("mrfm", {}), "runs": root.get("runs", []), "model": root.get("model", {}), "series": counts, "heads": heads, "index": dict(self.root["index"].attrs) if "index" in self.root else None}


def _array(group: zarr.Group, name: str, value: np.ndarray) -> zarr.Array:
    value = np.asarray(value)
    dtype = str if value.dtype.kind == "U" else value.dtype
    # one chunk per small array; zarr wants chunk sides >= 1, and "auto" for 0-d arrays
    chunks = tuple(max(1, s) for s in value.shape) if value.ndim else "auto"
    a = group.create_array(name, shape=value.shape, dtype=dtype, chunks=chunks, fill_value="" if dtype is str else 0)
    if value.size:
        a[...] = value
    return a


def _first_embedding(series_group: zarr.Group) -> str | None:
    heads = sorted(series_group.groups(), key=lambda kv: (kv[0] != "retrieve", kv[0]))
    for head, g in heads:
        for name, arr in g.arrays():
            if arr.attrs.get("kind") == "embedding":
                return f"{head}/{name}"
    return None


def open_store(path: str | Path, mode: str = "r") -> ResultStore:
    """Open a result store (``mode='r'`` to read, ``'a'`` to add to it)."""
    return ResultStore(path, mode)
