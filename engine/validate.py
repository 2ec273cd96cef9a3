"""``mrfm validate``: check a result store against schemas/store.schema.json and its rules.

Every violation is reported as 'path: message', so a broken store can be mended or explained;
:func:`iter_problems` yields each as the walk finds it (``mrfm validate`` prints them so).
Validation never raises on a damaged store: what cannot be read is itself a problem. ``deep``
also reads every chunk and verifies its checksum (cost: reading the whole store once).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from . import schemas
from .enums import FINAL_STATUSES
from .errors import StoreError
from .geometry import world_bounds
from .safe_paths import is_safe_name
from .store import DAMAGED, ResultStore
from .zarr_text import is_text, read_text

_KEY = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_REPORTED = 20  # status-table disagreements named one by one; more are counted


def _schema_errors(defn: str, instance: Any, path: str) -> list[str]:
    schema = {"$ref": f"#/$defs/{defn}", "$defs": schemas.load_schema("store")["$defs"]}
    import jsonschema  # only validate reads schemas

    out = []
    for err in jsonschema.Draft202012Validator(schema).iter_errors(instance):
        where = "/".join(str(p) for p in err.absolute_path)
        out.append(f"{path}{' attrs.' + where if where else ' attrs'}: {err.message}")
    return out


def _slash(problems: list[str]) -> list[str]:
    """Store messages name keys ('series/k/...'); validate names paths from the root ('/series/k/...')."""
    return [p if p.startswith("/") else "/" + p for p in problems]


def validate_store(path: str | Path, deep: bool = False) -> list[str]:
    """Every violation found in the store at ``path`` (a local path or a URL such as
    ``s3://bucket/results.zarr``; empty when valid)."""
    return list(iter_problems(path, deep))


def iter_problems(path: str | Path, deep: bool = False) -> Iterator[str]:
    """The violations of the store at ``path``, each yielded as it is found: the store is walked
    node by node (root, runs, each series, the index), never loaded whole, so a large or damaged
    store is reported as it goes, and a node that cannot be checked is one violation among the
    others, never the end of the walk."""
    try:
        store = ResultStore(path, mode="r")
    except StoreError as exc:
        yield str(exc)
        return
    except Exception as exc:
        yield f"{path}: not a Zarr v3 group ({exc})"
        return
    try:
        yield from _validate(store, deep)
    except Exception as exc:  # a last resort: validate reports, it never crashes
        yield f"{path}: could not be checked further ({type(exc).__name__}: {exc})"


def _validate(store: ResultStore, deep: bool) -> Iterator[str]:
    root = store.root
    yield from _schema_errors("root", dict(root.attrs), "/")
    lock = store.lock_problem()
    if lock:
        yield "/" + lock
    containers = {name: store.node_problem(name) for name in ("runs", "series")}
    broken = [f"/{name}: missing group" if p.endswith(": missing") else f"/{p}" for name, p in containers.items() if p]
    if broken:
        yield from broken
        return
    run_ids = set(root.attrs.get("runs", []))
    yield from _check_runs(store, run_ids)
    runs = store.runs()
    complete: set[str] = set()
    statuses: dict[str, str] = {}  # one short string per series: what the index is checked against
    for key, attrs in store.iter_series():
        try:
            yield from _check_series(store, key, attrs, run_ids, runs, deep)
        except Exception as exc:
            yield f"/series/{key}: could not be checked ({type(exc).__name__}: {exc})"
        statuses[key] = str(attrs.get("status"))
        if attrs.get("status") == "complete":
            complete.add(key)
    index_problems = _check_index(store, complete, deep)
    yield from index_problems
    if not any(p.startswith("/index") for p in index_problems):
        yield from _check_status_table(store, statuses)


def _check_runs(store: ResultStore, run_ids: set[str]) -> list[str]:
    problems = []
    recorded, effective = store.recorded_runs(), store.runs()
    for run_id in sorted(run_ids - set(recorded)):
        problems.append(f"/runs/{run_id}: listed in root attrs but missing")
    for run_id, attrs in effective.items():
        where = f"/runs/{run_id}"
        if attrs.get("status") == DAMAGED:
            problems.append("/" + attrs["reason"])
            continue
        problems += _schema_errors("run", attrs, where)
        if run_id not in run_ids:
            problems.append(f"{where}: not listed in root attrs 'runs'")
        if attrs.get("status") == "abandoned" and recorded[run_id].get("status") == "running":
            problems.append(f"{where}: left running by a process that is gone (abandoned); the next run marks it")
    return problems


def _check_series(
    store: ResultStore, key: str, attrs: dict[str, Any], run_ids: set[str], runs: dict[str, dict[str, Any]], deep: bool
) -> list[str]:
    where = f"/series/{key}"
    problems = []
    if not _KEY.match(key):
        problems.append(f"{where}: series key has characters outside [A-Za-z0-9._-]")
    status = attrs.get("status")
    if status == DAMAGED:
        return problems + [f"/{attrs['reason']} (series damaged; the next run redoes it)"]
    problems += _schema_errors("series", attrs, where)
    heads = attrs.get("heads")
    unsafe = [h for h in heads if not is_safe_name(h)] if isinstance(heads, dict) else []
    if unsafe:  # readers refuse to build a path from it; a forged store may name /tmp/victim
        problems.append(f"{where} attrs.heads: head name {unsafe[0]!r} is not a plain name (letters, digits, '._-')")
    run_id = attrs.get("run_id")
    if run_id and run_id not in run_ids:
        problems.append(f"{where} attrs.run_id: run {run_id!r} is not in the store")
    if status == "incomplete" and (runs.get(run_id) or {}).get("status") != "running":
        problems.append(f"{where}: left incomplete by run {run_id}, which is not running; the next run redoes it")
    if status in FINAL_STATUSES:
        problems += _slash(store.check_series(key, deep=deep))
        try:
            group = store.root["series"][key]
            if status == "complete":
                problems += _check_outputs(group, attrs, where)
        except Exception as exc:
            problems.append(f"{where}: unreadable ({type(exc).__name__}: {exc})")
    return problems


def _check_outputs(group: zarr.Group, attrs: dict[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    geometry = attrs.get("geometry") or {}
    shape = tuple(geometry.get("shape") or ())
    bounds = world_bounds(shape, np.asarray(geometry["affine"])) if shape and "affine" in geometry else None
    for head, info in (attrs.get("heads") or {}).items():
        if info.get("error"):
            continue
        for output in info.get("outputs", []):
            p = f"{where}/{head}/{output}"
            try:
                node = group[head][output]
            except Exception:
                continue  # reported by check_series as missing or damaged
            try:
                problems += _check_output(node, p, shape, bounds)
            except Exception as exc:
                problems.append(f"{p}: unreadable ({type(exc).__name__}: {exc})")
    return problems


def _check_output(node: Any, p: str, shape: tuple[int, ...], bounds: np.ndarray | None) -> list[str]:
    problems = _schema_errors("output", dict(node.attrs), p)
    kind = node.attrs.get("kind")
    if kind == "boxes":
        return problems + _check_boxes(node, p, bounds)
    if not isinstance(node, zarr.Array):
        return problems + [f"{p}: expected an array for kind {kind}"]
    if kind == "mask":
        labels = node.attrs.get("labels", [])
        # a multi-label mask holds one 0/1 channel per label; otherwise a label map on the grid
        multilabel = bool(node.attrs.get("multilabel"))
        want = (len(labels), *shape) if multilabel else shape
        if tuple(node.shape) != want:
            # its values are not read: a declared shape that is wrong may also be huge
            return problems + [
                f"{p}: mask shape {_shape_text(node.shape)} differs from {'(labels, *grid)' if multilabel else 'the series grid'} {want}"
            ]
        if not np.issubdtype(node.dtype, np.integer):
            problems.append(f"{p}: mask dtype {node.dtype} is not an integer label type")
        elif node.size and int(np.max(node[...])) >= (2 if multilabel else len(labels)):
            problems.append(
                f"{p}: mask holds values beyond {'0/1 per label' if multilabel else f'its {len(labels)} labels'}"
            )
    elif kind == "scores" and tuple(node.shape) != (len(node.attrs.get("labels", [])),):
        problems.append(f"{p}: {tuple(node.shape)} scores for {len(node.attrs.get('labels', []))} labels")
    elif kind == "embedding" and node.attrs.get("normalized"):
        norm = float(np.linalg.norm(node[...]))
        if abs(norm - 1) > 1e-3:
            problems.append(f"{p}: declared normalized but L2 norm is {norm:.4f}")
    return problems


def _shape_text(shape: tuple[int, ...]) -> str:
    text = str(tuple(shape))
    return text if len(text) <= 80 else text[:77] + "..."


def _check_boxes(node: Any, p: str, bounds: np.ndarray | None) -> list[str]:
    if not isinstance(node, zarr.Group):
        return [f"{p}: boxes must be a group of arrays"]
    arrays = dict(node.arrays())
    missing = [n for n in ("world", "voxel", "scores") if n not in arrays]
    if missing:
        return [f"{p}: boxes group lacks {missing}"]
    n = arrays["scores"].shape[0]
    problems = []
    for name, arr in arrays.items():
        want = (n, 6) if name in ("world", "voxel") else (n,)
        if is_text(arr) and tuple(arr.shape[:1]) == (n,):  # a text column: (n, width) UTF-8 bytes
            continue
        if tuple(arr.shape) != want:
            problems.append(f"{p}/{name}: shape {tuple(arr.shape)}, expected {want}")
    if problems or not n:
        return problems
    world = arrays["world"][...]
    if (world[:, 3:] < world[:, :3]).any() or (arrays["voxel"][...][:, 3:] < arrays["voxel"][...][:, :3]).any():
        problems.append(f"{p}: a box has a maximum corner below its minimum corner")
    if bounds is not None and ((world[:, :3] < bounds[:3] - 1e-3).any() or (world[:, 3:] > bounds[3:] + 1e-3).any()):
        problems.append(f"{p}/world: a box lies outside the series' world bounds")
    return problems


def _check_index(store: ResultStore, complete: set[str], deep: bool) -> list[str]:
    attrs = store.index_attrs()
    if attrs is None:
        return ["/index: missing group"] if complete else []
    if "damaged" in attrs:
        return [f"/{attrs['damaged']} (index damaged; the next run rebuilds it)"]
    problems = _schema_errors("index", attrs, "/index")
    if attrs.get("complete") is False:
        problems.append("/index: partial (a rebuild did not finish); the next run rebuilds it")
    damage = _slash(store.check_tree("index", deep=deep))
    if damage:
        return problems + [f"{p} (the next run rebuilds the index)" for p in damage]
    try:
        return problems + _check_index_rows(store.root["index"], attrs, complete)
    except Exception as exc:
        return problems + [f"/index: unreadable ({type(exc).__name__}: {exc}); the next run rebuilds it"]


def _check_index_rows(index: zarr.Group, attrs: dict[str, Any], complete: set[str]) -> list[str]:
    problems = []
    arrays = dict(index.arrays())
    if "series_key" not in arrays:
        return ["/index/series_key: missing"]
    keys = [str(k) for k in read_text(arrays["series_key"])]
    if len(set(keys)) != len(keys):
        problems.append("/index/series_key: duplicate keys")
    if "embedding" in arrays and arrays["embedding"].shape[0] != len(keys):
        problems.append(f"/index/embedding: {arrays['embedding'].shape[0]} rows for {len(keys)} keys")
    searchable = _searchable_keys(index, attrs, keys)
    stray = sorted(searchable - complete)
    if stray:
        problems.append(f"/index/series_key: {len(stray)} key(s) are not complete series, e.g. {stray[0]}")
    if "embedding" not in arrays and complete - searchable:
        problems.append(f"/index/series_key: {len(complete - searchable)} complete series missing from the index")
    if attrs.get("count") != len(searchable):
        problems.append(f"/index attrs.count: {attrs.get('count')} but {len(searchable)} keys")
    return problems


def _searchable_keys(index: zarr.Group, attrs: dict[str, Any], keys: list[str]) -> set[str]:
    """The keys search ranks: the compacted rows, as changed by the rows appended since."""
    out = set(keys)
    n = int(attrs.get("delta_rows") or 0)
    if n and "delta" in index:
        delta = index["delta"]
        for key, searchable in zip(
            read_text(delta["series_key"], slice(0, n)).tolist(), delta["searchable"][:n].tolist()
        ):
            (out.add if searchable else out.discard)(str(key))
    return out


def _check_status_table(store: ResultStore, statuses: dict[str, str]) -> list[str]:
    """The index's status table (what resume and inspect answer from) agrees with the groups."""
    view = store.index_view()
    if view is None:
        return []
    listed = view.lookup(list(statuses))
    problems = []
    for key, status in statuses.items():
        row = listed.get(key)
        if row is None:
            problems.append(f"/index/series: series {key} is not listed; the next run rebuilds the index")
        elif row[0] != status and not (row[0] == "unknown" or status == DAMAGED):
            problems.append(f"/index/series: series {key} is listed {row[0]} but its group says {status}")
    if view.rows() > len(statuses):
        problems.append(f"/index/series: {view.rows() - len(statuses)} row(s) for series groups that do not exist")
    return problems[:MAX_REPORTED] + (
        [f"/index/series: {len(problems) - MAX_REPORTED} more"] if len(problems) > MAX_REPORTED else []
    )
