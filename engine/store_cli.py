"""``mrfm store compact`` and ``mrfm store stats``: upkeep of a result store's index, and what a
store costs per series. Python users call :func:`compact_store` and :func:`store_stats`."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import click

from .store import ResultStore, open_store
from .terminal import printable

SAMPLE = 50  # series groups measured for files and bytes per series (listing every one is what the index avoids)


def compact_store(url: str) -> dict[str, Any]:
    """Rewrite the store's index compactly (appended rows folded in, superseded rows dropped,
    one chunk per column) under the store's lock; rebuilt from the groups when stale or damaged."""
    store = ResultStore(url, mode="a")
    before = _index_files(store)
    t = time.perf_counter()
    with store.lock(f"compact-{int(time.time())}"):
        done = store.compact_index()
    after = _index_files(store)
    return {
        **done,
        "seconds": round(time.perf_counter() - t, 3),
        "index_files_before": before[0],
        "index_bytes_before": before[1],
        "index_files_after": after[0],
        "index_bytes_after": after[1],
    }


def store_stats(url: str, sample: int = SAMPLE, seed: int = 0) -> dict[str, Any]:
    """Series by status, index rows, runs, and files and bytes per series (measured on a sample
    of ``sample`` series groups; ``sampled`` says how many)."""
    store = open_store(url, "r")
    info = store.summary()
    view = store.index_view()
    keys = [k for k in store._list_dir("series") if k != "zarr.json"]
    picked = sorted(random.Random(seed).sample(keys, min(sample, len(keys))))
    sizes = [_tree_size(store, f"series/{k}/") for k in picked]
    attrs = info.get("index") or {}
    files, nbytes = zip(*sizes) if sizes else ((), ())
    index_files, index_bytes = _index_files(store)
    return {
        "store": str(store.path),
        "series": info["series"],
        "series_groups": len(keys),
        "source": info["source"],
        "runs": len(info["runs"]),
        "run_status": _count(info["run_status"].values()),
        "index": {
            "rows": view.rows() if view else None,
            "searchable": attrs.get("count"),
            "compacted_rows": attrs.get("base_rows"),
            "appended_rows": attrs.get("delta_rows"),
            "files": index_files,
            "bytes": index_bytes,
            "current": view is not None,
        },
        "per_series": {
            "sampled": len(sizes),
            "files": _mean(files),
            "bytes": _mean(nbytes),
            "files_max": max(files, default=0),
            "bytes_max": max(nbytes, default=0),
        },
    }


def _tree_size(store: ResultStore, prefix: str) -> tuple[int, int]:
    from zarr.core.sync import sync  # zarr internals for one command

    keys = store._list_prefix(prefix)
    return len(keys), sum(sync(store.root.store.getsize(k)) for k in keys)


def _index_files(store: ResultStore) -> tuple[int, int]:
    return _tree_size(store, "index/")


def _mean(values: Any) -> float:
    values = list(values)
    return round(sum(values) / len(values), 1) if values else 0.0


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


@click.group("store")
def store() -> None:
    """Upkeep of a result store: compact its index, show what it holds and costs."""


@store.command("compact")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True)
def compact_cmd(url: str, as_json: bool) -> None:
    """Rewrite the index of STORE (a path or URL) compactly; takes the store's lock."""
    report = compact_store(url)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    how = "rebuilt from the series groups" if report["rebuilt"] else "compacted"
    click.echo(
        f"index {how}: {report['base_rows']} + {report['delta_rows']} appended rows -> {report['rows']} rows "
        f"({report['searchable']} searchable); files {report['index_files_before']} -> {report['index_files_after']}, "
        f"bytes {report['index_bytes_before']} -> {report['index_bytes_after']}, {report['seconds']} s"
    )


@store.command("stats")
@click.argument("url")
@click.option(
    "--sample",
    default=SAMPLE,
    show_default=True,
    type=click.IntRange(0),
    help="Series groups measured for files and bytes.",
)
@click.option("--json", "as_json", is_flag=True)
def stats_cmd(url: str, sample: int, as_json: bool) -> None:
    """Series by status, index rows, runs, files and bytes per series of STORE (a path or URL)."""
    report = store_stats(url, sample=sample)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    idx, per = report["index"], report["per_series"]
    # statuses are read from the store: printed through printable, like every stored string
    click.echo(
        f"{printable(report['store'])}: {report['series_groups']} series groups; "
        + ", ".join(f"{printable(k)} {v}" for k, v in sorted(report["series"].items()))
        + f" (from the {report['source']})"
    )
    click.echo(
        f"runs: {report['runs']} ("
        + ", ".join(f"{printable(k)} {v}" for k, v in sorted(report["run_status"].items()))
        + ")"
    )
    click.echo(
        f"index: {idx['rows']} rows, {idx['searchable']} searchable, {idx['compacted_rows']} compacted + "
        f"{idx['appended_rows']} appended, {idx['files']} files, {idx['bytes']} bytes"
        + ("" if idx["current"] else " (not current: the next run rebuilds it)")
    )
    click.echo(
        f"per series (sample of {per['sampled']}): {per['files']} files, {per['bytes']} bytes "
        f"(max {per['files_max']} files, {per['bytes_max']} bytes)"
    )
