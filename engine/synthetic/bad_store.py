"""Tampered-store corpus: a small valid result store, and each case a copy of it with one part
rewritten the way a damaged or hostile store could hold it.

``write_small_store(path)`` writes the valid store (one finished run, two complete series with a
mask, scores and an embedding, an index) through the store's own API, in a second.
``write_tampered_stores(out_dir)`` writes one store per case (``out_dir/<case>.zarr``) and returns
them; ``CASES`` maps each case to what mrfm must do with it. Every case is a node that names
itself: the readers (inspect, validate, search, export, the next run) must report it by that
name, never crash, allocate what it declares, or print its text raw to the terminal.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Callable

import numpy as np

SHAPE = (70, 20, 10)
FP = "sha256:" + "0" * 64
KEYS = ("s1", "s2")
MASK = "series/s1/segment/anatomy"
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b0m\x07"  # window title, clear screen, colour, C1 CSI, bell

CASES: dict[str, str] = {
    "huge_mask_shape": "mask zarr.json declares shape 10^63: reported, never allocated; the next run redoes the series",
    "huge_index_embedding": "index embedding declares 10^9 x 64: search exits 3 naming index/embedding",
    "huge_attribute": "a 50 MB attribute in a series' zarr.json: reported over the limit, not parsed",
    "deep_json": "a series' zarr.json nested 100,000 deep: reported, no RecursionError",
    "terminal_escapes": "ANSI/OSC/BEL in a description, a reason and a run id: printed escaped",
    "huge_chunk_grid": "an index column of 10^12 one-row chunks: reported, the grid is never listed",
    "escaped_key": "a series key holding ANSI/OSC/BEL (its folder and attributes): printed escaped, refused as a file name",
    "head_as_path": "a head recorded as an absolute path (STORE_PARENT/victim): never a file name, nothing written there",
    "root_slash": "a run record whose archive roots hold '/': never searched for sources",
}


# every command that reads a store, and the exit code each ends with on each case (where it is
# not the usual one); export dicom-seg fails every series of the corpus, which has no source files
READERS = (
    "validate",
    "validate --deep",
    "inspect",
    "search",
    "show",
    "show s1",
    "report",
    "export nifti",
    "export dicom-seg",
    "export table",
    "run",
)
_USUAL_EXIT = {"validate": 1, "validate --deep": 1, "export dicom-seg": 1}
_EXIT = {
    ("huge_index_embedding", "search"): 3,
    ("huge_chunk_grid", "search"): 3,
    ("huge_mask_shape", "export nifti"): 1,
    ("escaped_key", "export nifti"): 1,
    ("escaped_key", "export table"): 1,
    ("head_as_path", "export nifti"): 1,
    ("head_as_path", "export table"): 1,
    ("root_slash", "validate"): 0,
    ("root_slash", "validate --deep"): 0,
}


def expected_exit(case: str, command: str) -> int:
    """The exit code ``mrfm COMMAND`` must end with on the store of ``case``."""
    return _EXIT.get((case, command), _USUAL_EXIT.get(command, 0))


def reader_args(command: str, store: Path, out: Path, archive: Path) -> list[str]:
    """The mrfm arguments of one of READERS on ``store``: reports and exports into ``out``; the
    run resumes onto ``store`` from ``archive``."""
    s = str(store)
    if command.startswith("validate"):
        return ["validate", *command.split()[1:], s]
    if command.startswith("export"):
        return ["export", s, "--format", command.split()[1], "--out", str(out)]
    return {
        "inspect": ["inspect", s],
        "search": ["search", s, "--like", "s1", "-k", "2"],
        "show": ["show", s],
        "show s1": ["show", s, "s1"],
        "report": ["report", s, "--out", str(out)],
        "run": ["run", str(archive), "--out", s, "--heads", "classify,segment", "--backend", "torch", "--workers", "0"],
    }[command]


def write_small_store(path: Path, description: str = "T1 axial") -> Path:
    """A valid store of two complete series (mask, scores, embedding) and an index."""
    from engine.store import OutputArray, ResultStore, now

    store = ResultStore(path, mode="a")
    heads = {"segment": "anatomy", "retrieve": "embedding", "classify": "region"}
    info = {
        "started": now(),
        "config": {"paths": [], "heads": sorted(heads)},
        "model": {"name": "tiny", "fingerprint": FP},
        "heads": {h: {"version": "1"} for h in heads},
        "backend": {"name": "torch", "reason": "corpus"},
        "fingerprint": FP,
        "host": {"hostname": socket.gethostname(), "python": "3", "torch": "0"},
    }
    with store.lock("r1"):
        store.begin_run("r1", info)
        for i, key in enumerate(KEYS):
            rng = np.random.default_rng(i)
            emb = rng.normal(size=8).astype(np.float32)
            attrs = {
                "series_key": key,
                "study_uid": "1.2",
                "series_uid": key,
                "description": description,
                "reader": "dicom",
                "source": {"first": "a#1", "count": 10},
                "run_id": "r1",
                "fingerprint": FP,
                "geometry": {
                    "shape": list(SHAPE),
                    "affine": np.diag([1.0, 1.0, 2.0, 1.0]).tolist(),
                    "spacing": [1.0, 1.0, 2.0],
                    "orientation": "axial",
                },
                "heads": {
                    h: {"version": "1", "outputs": [o], "error": None, "fingerprint": FP, "run_id": "r1"}
                    for h, o in heads.items()
                },
            }
            outputs = [
                OutputArray(
                    "segment",
                    "1",
                    {"name": "anatomy", "kind": "mask", "labels": ["bg", "a", "b"]},
                    rng.integers(0, 3, SHAPE).astype(np.uint8),
                ),
                OutputArray(
                    "retrieve",
                    "1",
                    {"name": "embedding", "kind": "embedding", "dtype": "float32", "normalized": True},
                    emb / np.linalg.norm(emb),
                ),
                OutputArray(
                    "classify",
                    "1",
                    {"name": "region", "kind": "scores", "dtype": "float32", "labels": ["x", "y"]},
                    np.array([0.2, 0.8]),
                ),
            ]
            store.write_series(key, attrs, outputs, "complete")
        store.rebuild_index()
        store.finish_run("r1", {"finished": now()})
    return path


def _edit_meta(store: Path, node: str, change: Callable[[dict], dict | bytes]) -> None:
    file = store / node / "zarr.json"
    out = change(json.loads(file.read_text()))
    file.write_bytes(out if isinstance(out, bytes) else json.dumps(out).encode())


def _huge_mask_shape(store: Path) -> None:
    _edit_meta(store, MASK, lambda m: {**m, "shape": [10**63, 20, 10]})


def _huge_index_embedding(store: Path) -> None:
    def grow(m: dict) -> dict:
        m["shape"] = [10**9, 64]
        m["chunk_grid"]["configuration"]["chunk_shape"] = [10**9, 64]
        return m

    _edit_meta(store, "index/embedding", grow)


def _huge_attribute(store: Path) -> None:
    _edit_meta(store, "series/s2", lambda m: {**m, "attributes": {**m["attributes"], "notes": "x" * (50 * 2**20)}})


def _deep_json(store: Path) -> None:
    depth = 100_000
    _edit_meta(
        store, "series/s2", lambda m: json.dumps(m)[:-1].encode() + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    )


def _terminal_escapes(store: Path) -> None:
    _edit_meta(store, "series/s1", lambda m: {**m, "attributes": {**m["attributes"], "description": f"T1 {ESCAPES}"}})
    _edit_meta(
        store,
        "series/s2",
        lambda m: {**m, "attributes": {**m["attributes"], "status": "failed", "reason": f"bad {ESCAPES}"}},
    )


def _huge_chunk_grid(store: Path) -> None:
    def grow(m: dict) -> dict:
        m["shape"] = [10**12]
        m["chunk_grid"]["configuration"]["chunk_shape"] = [1]
        return m

    _edit_meta(store, "index/key_hash", grow)


def _escaped_key(store: Path) -> None:
    key = f"s2{ESCAPES}"
    (store / "series" / "s2").rename(store / "series" / key)
    _edit_meta(store, f"series/{key}", lambda m: {**m, "attributes": {**m["attributes"], "series_key": key}})


def victim(store: Path) -> Path:
    """The absolute path the ``head_as_path`` case records as a head's name."""
    return store.parent / "victim"


def _head_as_path(store: Path) -> None:
    name = str(victim(store))
    for meta in store.glob("series/*/zarr.json"):
        doc = json.loads(meta.read_text())
        doc["attributes"]["heads"][name] = doc["attributes"]["heads"].pop("segment")
        meta.write_text(json.dumps(doc))
        node = meta.parent / name.strip("/")  # where zarr finds the name: its outputs moved there
        node.parent.mkdir(parents=True, exist_ok=True)
        for parent in [node.parent, *node.parent.parents]:
            if parent == meta.parent:
                break
            (parent / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
        (meta.parent / "segment").rename(node)


def _root_slash(store: Path) -> None:
    for meta in store.glob("runs/*/zarr.json"):
        doc = json.loads(meta.read_text())
        doc["attributes"]["config"]["paths"] = ["/"]
        meta.write_text(json.dumps(doc))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "huge_mask_shape": _huge_mask_shape,
    "huge_index_embedding": _huge_index_embedding,
    "huge_attribute": _huge_attribute,
    "deep_json": _deep_json,
    "terminal_escapes": _terminal_escapes,
    "huge_chunk_grid": _huge_chunk_grid,
    "escaped_key": _escaped_key,
    "head_as_path": _head_as_path,
    "root_slash": _root_slash,
}


def tamper(store: Path, case: str) -> Path:
    """Rewrite ``store`` (a copy of any result store) the way ``case`` says; returns it."""
    BUILDERS[case](Path(store))
    return Path(store)


def write_tampered_stores(out_dir: Path, cases: list[str] | None = None, clean: Path | None = None) -> dict[str, Path]:
    """One tampered copy of a small valid store (or of ``clean``) per case: ``out_dir/<case>.zarr``."""
    out_dir = Path(out_dir)
    if clean is None:
        shutil.rmtree(
            out_dir / "clean.zarr", ignore_errors=True
        )  # written afresh: the corpus is regenerated, not resumed
        clean = write_small_store(out_dir / "clean.zarr")
    made = {}
    for case in cases or list(CASES):
        target = out_dir / f"{case}.zarr"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(clean, target)
        made[case] = tamper(target, case)
    return made


__all__ = [
    "CASES",
    "ESCAPES",
    "READERS",
    "expected_exit",
    "reader_args",
    "tamper",
    "victim",
    "write_small_store",
    "write_tampered_stores",
]
