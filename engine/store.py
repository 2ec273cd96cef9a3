"""The result store: one Zarr v3 group per series, run provenance and a columnar index.

The store knows nothing of torch or of heads' code; it writes the numpy arrays and attributes the
pipeline hands it. Layout (see schemas/store.schema.json)::

    results.zarr/            attrs: mrfm {format_version, version}, runs [ids], model {...}
      .mrfm-lock             JSON {host, pid, run_id, started} while a run writes the store
      runs/<run_id>          attrs: config, model, heads, backend, host, pid, status, timings, counts
      series/<key>/          attrs: uids, source, geometry, status, reason, run_id, fingerprint
        <head>/<output>      mask | scores | value | embedding arrays; boxes are a group
      index/                 series_key, study_uid, description, embedding (one raw chunk)

Integrity: one writer at a time (the lock file); every chunk ends in a crc32c checksum and every
chunk of every array is written (even all-fill ones), so a damaged chunk raises on read and a
deleted one is found by listing. Readers never trust a node's metadata blindly: an unreadable
series group is reported as ``damaged`` and the next run redoes it.

:class:`ResultStore` holds its collaborators: the lock (:class:`.store_lock.StoreLock`), the damage
checks (:class:`.store_checks.StoreChecks`) and the index (:class:`.store_index.StoreIndex`); it
keeps their methods, handing them on. Writing one series' outputs as Zarr nodes and chunks is
:mod:`.store_outputs`.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Iterator

import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import collect_aiterator, sync
from zarr.storage import FsspecStore

from ._version import __version__
from .enums import FINAL_STATUSES, RUN_ENDS, RUN_STATUSES, SERIES_STATUSES  # noqa: F401 (RUN_STATUSES: public here)
from .errors import StoreError
from .disk_full import disk_full, no_space
from .faults import killpoint
from .out_folders import check_store_folder, local_entries
from .safe_paths import safe_name
from .store_bounds import MAX_META_BYTES
from .store_checks import DAMAGED, StoreChecks, _parse_meta
from .store_index import IndexView, StoreIndex, _Row
from .store_outputs import write_outputs
from .store_lock import (
    StoreLock,
    _Heartbeat,  # noqa: F401 (re-exported)
    _holder_state,
)

# re-exported: names older code and tests import from here ("X as X" marks a re-export)
from .enums import ROW_STATUSES as ROW_STATUSES
from .store_checks import _shard_checksummed as _shard_checksummed
from .store_index import key_hashes as key_hashes
from .store_outputs import OutputArray as OutputArray
from .store_checks import MAX_LISTED as MAX_LISTED
from .store_checks import _chunk_keys as _chunk_keys
from .store_checks import _shard_problem as _shard_problem
from .store_lock import LOCK_NAME as LOCK_NAME
from .store_lock import _ago as _ago
from .store_lock import _create_exclusive as _create_exclusive
from .store_lock import _create_object_exclusive as _create_object_exclusive
from .store_lock import _locked_message as _locked_message
from .store_lock import _pid_alive as _pid_alive
from .store_lock import _unsupported_conditional as _unsupported_conditional
from .store_lock import lock_stale_seconds as lock_stale_seconds
from .zarr_nodes import NodeUnreadable, now
from .zarr_text import is_text, read_text

FORMAT_VERSION = 2  # 2: checksummed chunks, store lock, run status interrupted/abandoned
STATUSES = SERIES_STATUSES  # what write_series writes


def _damaged(reason: str) -> dict[str, Any]:
    return {"status": DAMAGED, "reason": reason}


class ResultStore:
    """A Zarr v3 result store opened for reading (``mode='r'``) or writing."""

    def __init__(self, path: str | Path, mode: str = "a"):
        self.url = str(path)
        self.remote = is_remote(self.url)
        # local stores keep a Path (lock file, memory-mapped index); remote ones their URL
        self.path: Path | str = self.url.rstrip("/") if self.remote else _local_path(path)
        self.read_only = mode == "r"
        self.locking = StoreLock(self)
        self.checks = StoreChecks(self)
        self.indexing = StoreIndex(self)
        try:
            zstore = self._open_zarr_store()
            from zarr.abc.store import RangeByteRequest  # an oversized root zarr.json is refused unread

            root_meta = sync(
                zstore.get(
                    "zarr.json",
                    prototype=default_buffer_prototype(),
                    byte_range=RangeByteRequest(0, MAX_META_BYTES + 1),
                )
            )
        except FileNotFoundError:
            root_meta, zstore = None, None
        except Exception as exc:
            if _unreachable(exc):  # not "no zarr.json": the store may be fine, the way to it is not
                raise StoreError(f"cannot reach {self.url} ({type(exc).__name__}: {exc})") from exc
            if not isinstance(exc, (OSError, ValueError, TypeError)):
                raise
            raise StoreError(f"{self.path}: cannot open the result store ({type(exc).__name__}: {exc})") from exc
        if self.read_only and (root_meta is None or zstore is None):
            raise FileNotFoundError(f"{self.path} is not a Zarr v3 store (no zarr.json)")
        if root_meta is not None:
            _check_json_bytes(f"{self.path}/zarr.json", root_meta.to_bytes())
        if not self.read_only:  # never take over a folder that holds anything but an mrfm store
            try:
                entries = (
                    local_entries(self.path)
                    if not self.remote or zstore is None
                    else collect_aiterator(zstore.list_dir(""))
                )
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot list the store's folder ({type(exc).__name__}: {exc})") from exc
            check_store_folder(str(self.path), entries, None if root_meta is None else root_meta.to_bytes())
        try:
            self.root = zarr.open_group(zstore, mode=mode, zarr_format=3)
            if not self.read_only and "mrfm" not in self.root.attrs:
                self.root.update_attributes(
                    {"mrfm": {"format_version": FORMAT_VERSION, "version": __version__, "created": now()}, "runs": []}
                )
            if not self.read_only:
                for name in ("runs", "series"):
                    self._require_container(name)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"{self.path}: cannot open the result store ({type(exc).__name__}: {exc})") from exc

    def _open_zarr_store(self) -> Any:
        if not self.remote:
            if not self.read_only:
                self.path.mkdir(parents=True, exist_ok=True)
            return zarr.storage.LocalStore(self.path, read_only=self.read_only)
        return FsspecStore.from_url(self.url, storage_options=storage_options(self.url), read_only=self.read_only)

    # ---- raw store access: works whatever a node's metadata holds -----------------------------
    def _list_dir(self, prefix: str) -> list[str]:
        return sorted(collect_aiterator(self.root.store.list_dir(prefix)))

    def _list_prefix(self, prefix: str) -> set[str]:
        return set(collect_aiterator(self.root.store.list_prefix(prefix)))

    def _get(self, key: str) -> bytes | None:
        buf = sync(self.root.store.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def _get_head(self, key: str, nbytes: int) -> bytes | None:
        """At most the first ``nbytes`` of ``key``."""
        buf = sync(
            self.root.store.get(key, prototype=default_buffer_prototype(), byte_range=RangeByteRequest(0, nbytes))
        )
        return None if buf is None else buf.to_bytes()

    def _delete_prefix(self, prefix: str) -> None:
        sync(self.root.store.delete_dir(prefix))

    def _node_meta(self, node: str) -> dict[str, Any]:
        """The parsed zarr.json of ``node``; raises NodeUnreadable naming the file."""
        key = f"{node}/zarr.json"
        raw = self._get_head(key, MAX_META_BYTES + 1)  # an oversized one is refused unread
        if raw is None:
            raise NodeUnreadable(f"{key}: missing")
        return _parse_meta(key, raw)

    def node_problem(self, node: str) -> str | None:
        """'node/zarr.json: why' when the node's metadata is missing or unreadable, else None."""
        try:
            self._node_meta(node)
        except NodeUnreadable as exc:
            return str(exc)
        return None

    def _require_container(self, name: str) -> None:
        """Create runs/ or series/, or rewrite its metadata when damaged (they hold no attributes)."""
        problem = self.node_problem(name)
        if problem is None:
            return
        if not self._list_dir(name):
            self.root.require_group(name)
            return
        meta = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()
        sync(self.root.store.set(f"{name}/zarr.json", default_buffer_prototype().buffer.from_bytes(meta)))

    # ---- lock: engine.store_lock; damage checks: engine.store_checks ---------------------------
    @property
    def lock_path(self) -> Path | str:
        return self.locking.lock_path

    @property
    def lock_notes(self) -> list[str]:
        """What the last acquire_lock broke on its way in (a stale or unreadable lock)."""
        return self.locking.lock_notes

    def lock_holder(self) -> dict[str, Any] | None:
        """The lock's record: None when unlocked, {} when unreadable (being written or damaged)."""
        return self.locking.lock_holder()

    def acquire_lock(self, run_id: str) -> dict[str, Any]:
        """Take the store's lock for ``run_id`` (see :meth:`StoreLock.acquire_lock`)."""
        return self.locking.acquire_lock(run_id)

    def free_reserve(self) -> None:
        """Give back the space held beside the lock (see :meth:`StoreLock.free_reserve`)."""
        self.locking.free_reserve()

    def release_lock(self) -> None:
        """Remove the lock if this store object holds it (never someone else's)."""
        self.locking.release_lock()

    def lock(self, run_id: str) -> AbstractContextManager[dict[str, Any]]:
        """``with store.lock(run_id):`` holds the store for one run."""
        return self.locking.lock(run_id)

    def lock_problem(self) -> str | None:
        """'path: message' for a lock left by a dead process or unreadable; None otherwise."""
        return self.locking.lock_problem()

    # ---- damage checks: engine.store_checks; index: engine.store_index -----------------------
    def check_series(self, key: str, deep: bool = False) -> list[str]:
        """Problems that make a series' stored outputs untrustworthy (see :meth:`StoreChecks.check_series`)."""
        return self.checks.check_series(key, deep)

    def check_tree(self, node: str, deep: bool = False) -> list[str]:
        """Problems of every node under ``node`` (e.g. 'index'): metadata, chunks, checksums."""
        return self.checks.check_tree(node, deep)

    def rebuild_index(self, embedding_source: str | None = None) -> int:
        """Rewrite index/ from every series group (see :meth:`StoreIndex.rebuild_index`)."""
        return self.indexing.rebuild_index(embedding_source)

    def update_index(self) -> int:
        """Bring index/ up to date with this object's writes (see :meth:`StoreIndex.update_index`)."""
        return self.indexing.update_index()

    def compact_index(self) -> dict[str, int]:
        """Rewrite index/ as one chunk per column (see :meth:`StoreIndex.compact_index`)."""
        return self.indexing.compact_index()

    def index_view(self) -> IndexView | None:
        """The index's status table when it can answer for every series group, else None."""
        return self.indexing.index_view()

    def index_attrs(self) -> dict[str, Any] | None:
        """index/ attributes; None when absent; {'damaged': reason} when unreadable."""
        return self.indexing.index_attrs()

    def triage(self, keys: list[str], head_fingerprints: dict[str, str], verify: str = "deep") -> dict[str, set[str]]:
        """Heads still to run per series key (see :meth:`StoreIndex.triage`)."""
        return self.indexing.triage(keys, head_fingerprints, verify)

    def note_series(self, keys: list[str]) -> None:
        """Owe index rows for series groups written by other store objects (see :meth:`StoreIndex.note_series`)."""
        self.indexing.note_series(keys)

    @property
    def index_skipped(self) -> list[str]:
        """Series the last index write left out of search, as 'series/key: why'."""
        return self.indexing.skipped

    # examples/store_scale.py fills a large index by hand through these three
    @property
    def _index_rows(self) -> dict[str, _Row]:
        return self.indexing.owed

    @_index_rows.setter
    def _index_rows(self, rows: dict[str, _Row]) -> None:
        self.indexing.owed = rows

    def _resolve_embeddings(self, rows: dict[str, _Row], source: str | None, skipped: list[str]) -> None:
        self.indexing._resolve_embeddings(rows, source, skipped)

    def _write_index(self, rows: dict[str, _Row], source: str | None, skipped: list[str]) -> int:
        return self.indexing._write_index(rows, source, skipped)

    def _live_run(self) -> str | None:
        """The run id of a lock holder that may still be running (live, or on another host)."""
        holder = self.lock_holder()
        if holder and _holder_state(holder) in ("live", "foreign"):
            return holder.get("run_id")
        return None

    # ---- runs -------------------------------------------------------------------------------
    def begin_run(self, run_id: str, info: dict[str, Any]) -> None:
        """Record a run as ``running``, with the pid and hostname that tell later if it died."""
        host = {"hostname": socket.gethostname(), **(info.get("host") or {})}
        record = {**info, "host": host, "pid": info.get("pid", os.getpid()), "status": "running"}
        killpoint("run-record")
        self.root.require_group("runs").create_group(run_id).update_attributes(record)
        attrs = dict(self.root.attrs)
        self.root.update_attributes({"runs": [*attrs.get("runs", []), run_id], "model": info.get("model", {})})

    def discard_run(self, run_id: str) -> None:
        """Remove the partial record of a run whose begin_run failed (a full disk), so that no
        record without its required attributes is left; called with the lock held."""
        self._delete_prefix(f"runs/{run_id}")

    def finish_run(self, run_id: str, info: dict[str, Any], status: str = "finished") -> None:
        if status not in RUN_ENDS:
            raise ValueError(f"a run ends {', '.join(RUN_ENDS)}, not {status!r}")
        killpoint("run-end")
        self.root["runs"][run_id].update_attributes({**info, "status": status})

    def mark_abandoned(self, current: str | None = None) -> list[str]:
        """Mark every run still recorded ``running``, except ``current``, as abandoned.

        Called with the lock held, when no other writer can be alive. Returns the runs marked.
        """
        marked = []
        for run_id, attrs in self.recorded_runs().items():
            if run_id == current or attrs.get("status") != "running":
                continue
            try:
                self.root["runs"][run_id].update_attributes(
                    {"status": "abandoned", "abandoned": now(), "reason": "its process ended before the run finished"}
                )
                marked.append(run_id)
            except Exception:  # a damaged run record stays as it is; validate reports it
                continue
        return marked

    def recorded_runs(self) -> dict[str, dict[str, Any]]:
        """Recorded attrs per run (a damaged record reads as {'status': 'damaged', ...})."""
        out = {}
        for name in self._list_dir("runs"):
            if name == "zarr.json":
                continue
            try:
                out[name] = dict(self._node_meta(f"runs/{name}").get("attributes") or {})
            except NodeUnreadable as exc:
                out[name] = _damaged(str(exc))
        return out

    def runs(self) -> dict[str, dict[str, Any]]:
        """Run records by id, oldest first; a ``running`` run whose process is gone reads ``abandoned``."""
        live = self._live_run()
        out = self.recorded_runs()
        for run_id, attrs in out.items():
            if attrs.get("status") == "running" and run_id != live:
                attrs["status"] = "abandoned"
        return out

    # ---- series -----------------------------------------------------------------------------
    def series_attrs(self, key: str) -> dict[str, Any] | None:
        """A series' attributes; None when absent; ``{'status': 'damaged', 'reason'}`` when unreadable."""
        node = f"series/{key}"
        try:
            meta = self._node_meta(node)
        except NodeUnreadable as exc:
            if str(exc).endswith(": missing") and not self._list_dir(node):
                return None
            return _damaged(str(exc))
        if meta.get("node_type") != "group":
            return _damaged(f"{node}/zarr.json: not a group")
        return dict(meta.get("attributes") or {})

    def iter_series(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key, attrs) of every series, sorted; an unreadable group yields status 'damaged'."""
        for name in self._list_dir("series"):
            if name == "zarr.json":
                continue
            attrs = self.series_attrs(name)
            if attrs is not None:
                yield name, attrs

    def pending_heads(self, key: str, head_fingerprints: dict[str, str], deep: bool = False) -> set[str]:
        """Heads still to run on a series: missing, failed, or fit with another fingerprint.

        Every head is pending when the group is absent, damaged, incomplete, or check_series
        finds a problem (``deep`` adds checksum verification of every chunk). An empty set means
        resume may skip the series.
        """
        attrs = self.series_attrs(key)
        if not attrs or attrs.get("status") not in FINAL_STATUSES:
            return set(head_fingerprints)
        if self.check_series(key, deep=deep):
            return set(head_fingerprints)
        done = attrs.get("heads", {})
        return {
            name
            for name, fp in head_fingerprints.items()
            if name not in done or done[name].get("error") or done[name].get("fingerprint") != fp
        }

    def write_series(
        self,
        key: str,
        attrs: dict[str, Any],
        outputs: list[OutputArray],
        status: str,
        reason: str | None = None,
        replace: bool = False,
    ) -> None:
        """Write one series group; ``status`` goes in last, so a crash leaves 'incomplete'.

        Outputs of heads that this write does not touch are kept (adding a head to a store costs
        nothing already written), unless ``replace`` is set, the grid has changed, or the stored
        group is damaged or incomplete (then it is deleted and written afresh). A failed write
        marks the group failed with its reason, best effort, and raises StoreError.
        """
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        safe_name(key, "series key")  # a key such as '..' would name the store's own folder
        new_heads = attrs.get("heads", {})
        group = None
        try:
            group, kept, merged = self._open_for_write(key, attrs, replace)
            heads = merged["heads"]
            geometry = merged.get("geometry") or {}
            shape = tuple(geometry.get("shape") or ())
            write_outputs(group, outputs, shape, geometry)
            errors = [r["error"] for r in heads.values() if r.get("error")]
            if status == "complete" and errors:
                status, reason = "failed", "; ".join(errors)
            # the status goes in last, in the group's second and final metadata write
            group.update_attributes({"status": status, "reason": reason, "written": now()})
            self.indexing.note_write(key, merged, status, outputs)
        except Exception as exc:
            self.indexing.note_unknown(key)
            if no_space(exc) is not None:  # the group stays incomplete; the run stops (exit 3)
                raise disk_full(self.path, exc) from exc
            why = f"could not write series group: {type(exc).__name__ if not str(exc) else exc}"
            self._mark_write_failed(group, new_heads, why)
            raise StoreError(f"series/{key}: {why}") from exc

    def _open_for_write(
        self, key: str, attrs: dict[str, Any], replace: bool
    ) -> tuple[zarr.Group, dict[str, Any], dict[str, Any]]:
        """The series group to write into (its attributes already marked incomplete, in one
        metadata write), the head records it keeps, and the attributes it now holds."""
        series = self.root.require_group("series")
        old = self.series_attrs(key)
        same_grid = old is not None and ("geometry" not in attrs or old.get("geometry") == attrs["geometry"])
        keep = (
            old is not None
            and same_grid
            and not replace
            and old.get("status") in FINAL_STATUSES
            and not self.check_series(key)
        )
        if not keep:
            if old is not None:
                self._delete_prefix(f"series/{key}")  # store-level: works when zarr.json is unreadable
            merged = {**attrs, "heads": dict(attrs.get("heads", {})), "status": "incomplete", "reason": None}
            return series.create_group(key, attributes=merged), {}, merged
        group = series[key]
        new_heads = attrs.get("heads", {})
        kept = {h: r for h, r in old.get("heads", {}).items() if h not in new_heads}
        # merge: a kept group keeps its geometry when this write has none (load failed)
        merged = {**old, **attrs, "heads": {**kept, **new_heads}, "status": "incomplete", "reason": None}
        group.update_attributes(merged)
        for name in list(group.group_keys()):
            if name not in kept:
                del group[name]
        return group, kept, merged

    def _mark_write_failed(self, group: zarr.Group | None, new_heads: dict[str, Any], why: str) -> None:
        """Best effort: small attribute writes often succeed where chunk writes failed (disk full)."""
        if group is None:
            return
        try:
            heads = dict(group.attrs.get("heads") or {})
            for name in new_heads:
                if name in heads:
                    heads[name] = {**heads[name], "error": heads[name].get("error") or why}
            group.update_attributes({"status": "failed", "reason": why, "heads": heads, "written": now()})
        except Exception:
            pass

    def read_output(self, key: str, head: str, output: str) -> Any:
        """An output as numpy (a dict of arrays for boxes); a damaged chunk raises StoreError."""
        try:
            node = self.root["series"][key][head][output]
            if isinstance(node, zarr.Group):
                return {name: read_text(arr) if is_text(arr) else arr[...] for name, arr in node.arrays()} | {
                    "attrs": dict(node.attrs)
                }
            return node[...]
        except KeyError:
            raise
        except Exception as exc:
            raise StoreError(f"series/{key}/{head}/{output}: unreadable ({type(exc).__name__}: {exc})") from exc

    def summary(self, from_groups: bool = False) -> dict[str, Any]:
        """Runs, series by status and heads. Counts come from the index's status table when it
        is current (``source: index``; damage since is found by validate), else from every group."""
        view = None if from_groups else self.index_view()
        if view is not None:
            counts, heads = view.counts()
        else:
            counts, heads = {}, {}
            for _, attrs in self.iter_series():
                status = str(attrs.get("status", "?"))
                counts[status] = counts.get(status, 0) + 1
                for h in attrs.get("heads") or {}:
                    heads[h] = heads.get(h, 0) + 1
        root, runs = dict(self.root.attrs), self.runs()
        return {
            "path": str(self.path),
            "format": root.get("mrfm", {}),
            "runs": root.get("runs", []),
            "run_status": {r: a.get("status") for r, a in runs.items()},
            "lock": self.lock_holder(),
            "model": root.get("model", {}),
            "series": counts,
            "heads": heads,
            "index": self.index_attrs(),
            "out_of_distribution": {r: (a.get("counts") or {}).get("out_of_distribution") for r, a in runs.items()},
            "source": "index" if view is not None else "groups",
        }


def _check_json_bytes(name: str, raw: bytes) -> None:
    """Raise StoreError naming ``name`` when ``raw`` is not Zarr v3 JSON metadata."""
    try:
        _parse_meta(name, raw)
    except NodeUnreadable as exc:
        raise StoreError(f"{exc}; the store's root metadata is damaged") from None


def _unreachable(exc: BaseException) -> bool:
    """The error (or one it came from) is a failed connection: refused, timed out, no route, no
    such host. Object-store clients raise their own types (botocore's EndpointConnectionError,
    aiohttp's ClientConnectorError), so they are recognised by name too."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) or "Connect" in type(exc).__name__:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_remote(location: str | Path) -> bool:
    """True for a URL that fsspec opens (s3://, gs://, memory://, ...); file:// and paths are local."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def _local_path(location: str | Path) -> Path:
    text = str(location)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the JSON object in MRFM_STORAGE_OPTIONS, plus the S3 endpoint
    from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (an S3-compatible server). Credentials come
    from the usual environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)."""
    raw = os.environ.get("MRFM_STORAGE_OPTIONS", "").strip()
    try:
        opts = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise StoreError(f"MRFM_STORAGE_OPTIONS is not JSON ({exc})") from None
    if not isinstance(opts, dict):
        raise StoreError("MRFM_STORAGE_OPTIONS must be a JSON object")
    if url.startswith(("s3://", "s3a://")) and "endpoint_url" not in opts:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
    return opts


def open_store(path: str | Path, mode: str = "r") -> ResultStore:
    """Open a result store (``mode='r'`` to read, ``'a'`` to add to it)."""
    return ResultStore(path, mode)
