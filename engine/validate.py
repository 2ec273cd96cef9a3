"""``mrfm validate``: check a result store against schemas/store.schema.json and its rules.

Every violation is reported as 'path: message', so a broken store can be mended or explained.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import schemas
from .mapping import grid_world_bounds

_KEY = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def _schema_errors(defn: str, instance: Any, path: str) -> list[str]:
    schema = {"$ref": f"#/$defs/{defn}", "$defs": schemas.load_schema("store")["$defs"]}
    import jsonschema

    out = []
    for err in jsonschema.Draft202012Validator(schema).iter_errors(instance):
        where = "/".join(str(p) for p in err.absolute_path)
        out.append(f"{path}{' attrs.' + where if where else ' attrs'}: {err.message}")
    return out


def validate_store(path: str | Path) -> list[str]:
    """Every violation found in the store at ``path`` (empty when valid)."""
    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception as exc:
        return [f"{path}: not a Zarr v3 group ({exc})"]
    problems = _schema_errors("root", dict(root.attrs), "/")
    run_ids = set(root.attrs.get("runs", []))
    for name in ("runs", "series"):
        if name not in root:
            problems.append(f"/{name}: missing group")
    if problems and any(p.startswith("/runs:") or p.startswith("/series:") for p in problems):
        return problems
    runs = dict(root["runs"].groups())
    for run_id in sorted(run_ids - set(runs)):
        problems.append(f"/runs/{run_id}: listed in root attrs but missing")
    for run_id, group in sorted(runs.items()):
        problems += _schema_errors("run", dict(group.attrs), f"/runs/{run_id}")
        if run_id not in run_ids:
            problems.append(f"/runs/{run_id}: not listed in root attrs 'runs'")
    complete: dict[str, zarr.Group] = {}
    for key, group in sorted(root["series"].groups()):
        where = f"/series/{key}"
        attrs = dict(group.attrs)
        if not _KEY.match(key):
            problems.append(f"{where}: series key has characters outside [A-Za-z0-9._-]")
        problems += _schema_errors("series", attrs, where)
        if attrs.get("run_id") and attrs["run_id"] not in run_ids:
            problems.append(f"{where} attrs.run_id: run {attrs['run_id']!r} is not in the store")
        if attrs.get("status") == "complete":
            complete[key] = group
            problems += _check_outputs(group, attrs, where)
    problems += _check_index(root, complete)
    return problems


def _check_outputs(group: zarr.Group, attrs: dict[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    geometry = attrs.get("geometry") or {}
    shape = tuple(geometry.get("shape") or ())
    bounds = grid_world_bounds(shape, np.asarray(geometry["affine"])) if shape and "affine" in geometry else None
    for head, info in (attrs.get("heads") or {}).items():
        if info.get("error"):
            continue
        for output in info.get("outputs", []):
            p = f"{where}/{head}/{output}"
            try:
                node = group[head][output]
            except KeyError:
                problems.append(f"{p}: declared output missing")
                continue
            problems += _schema_errors("output", dict(node.attrs), p)
            kind = node.attrs.get("kind")
            if kind == "boxes":
                problems += _check_boxes(node, p, bounds)
                continue
            if not isinstance(node, zarr.Array):
                problems.append(f"{p}: expected an array for kind {kind}")
                continue
            if kind == "mask":
                if tuple(node.shape) != shape:
                    problems.append(f"{p}: mask shape {tuple(node.shape)} differs from the series grid {shape}")
                if not np.issubdtype(node.dtype, np.integer):
                    problems.append(f"{p}: mask dtype {node.dtype} is not an integer label type")
                elif node.size and int(np.max(node[...])) >= len(node.attrs.get("labels", [])):
                    problems.append(f"{p}: mask holds label values beyond its {len(node.attrs.get('labels', []))} labels")
            elif kind == "scores" and tuple(node.shape) != (len(node.attrs.get("labels", [])),):
                problems.append(f"{p}: {tuple(node.shape)} scores for {len(node.attrs.get('labels', []))} labels")
            elif kind == "embedding" and node.attrs.get("normalized"):
                norm = float(np.linalg.norm(node[...]))
                if abs(norm - 1) > 1e-3:
                    problems.append(f"{p}: declared normalized but L2 norm is {norm:.4f}")
    return problems


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


def _check_index(root: zarr.Group, complete: dict[str, zarr.Group]) -> list[str]:
    if "index" not in root:
        return ["/index: missing group"] if complete else []
    index = root["index"]
    problems = _schema_errors("index", dict(index.attrs), "/index")
    arrays = dict(index.arrays())
    if "series_key" not in arrays:
        return problems + ["/index/series_key: missing"]
    keys = [str(k) for k in arrays["series_key"][...]]
    if len(set(keys)) != len(keys):
        problems.append("/index/series_key: duplicate keys")
    stray = sorted(set(keys) - set(complete))
    if stray:
        problems.append(f"/index/series_key: {len(stray)} key(s) are not complete series, e.g. {stray[0]}")
    if "embedding" in arrays:
        if arrays["embedding"].shape[0] != len(keys):
            problems.append(f"/index/embedding: {arrays['embedding'].shape[0]} rows for {len(keys)} keys")
    elif set(complete) - set(keys):
        problems.append(f"/index/series_key: {len(set(complete) - set(keys))} complete series missing from the index")
    if index.attrs.get("count") != len(keys):
        problems.append(f"/index attrs.count: {index.attrs.get('count')} but {len(keys)} keys")
    return problems
