"""The commands that read or look after a result store: ``mrfm inspect``, ``validate`` and
``search`` (what a store holds, whether it is sound, which series match), and ``mrfm store
compact`` and ``mrfm store stats`` (upkeep of its index, and what it costs per series). Python
users call :func:`compact_store`, :func:`store_stats`, :func:`engine.validate.iter_problems` and
:func:`engine.search.search`. Loaded only when one of these commands runs."""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

import click
from rich.table import Table

from .cli_shared import STATUS_STYLE, console, err_console, esc, open_existing, plural, short, styled, utf8_text
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


# ---- reading a store: inspect, validate, search -------------------------------------------------------------------------------------
@click.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", default=200, show_default=True, type=click.IntRange(0), help="Series rows to list (0: all).")
def inspect(store, as_json, limit) -> None:
    """Summarise a result store (a path or a URL such as s3://bucket/store): runs, series by
    status, heads, index."""
    s = open_existing(store, open_store)
    info = s.summary()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    fmt, model = info.get("format") or {}, info.get("model") or {}
    console.print(
        f"[bold]{esc(info['path'])}[/]  format {esc(fmt.get('format_version'))}  mrfm {esc(fmt.get('version'))}"
    )
    console.print(f"model {esc(model.get('name'))} {esc(str(model.get('fingerprint') or '')[:23])}…")
    counts = info.get("series") or {}
    console.print("series: " + (", ".join(f"{styled(k)} {v}" for k, v in sorted(counts.items())) or "none"))
    flagged = {r: n for r, n in (info.get("out_of_distribution") or {}).items() if n}
    if flagged:
        console.print(
            "[magenta]" + "; ".join(f"out of distribution {n} (run {esc(r)})" for r, n in flagged.items()) + "[/]"
        )
    table = Table(title="runs")
    for col in ("run", "status", "backend", "heads", "series", "seconds"):
        table.add_column(col, overflow="fold")
    for run_id, attrs in s.runs().items():
        c = attrs.get("counts") or {}
        counts = " ".join(
            f"[{STATUS_STYLE[k]}]{k} {c[k]}[/]" for k in STATUS_STYLE if isinstance(c.get(k), int) and c.get(k)
        )
        if c.get("out_of_distribution"):
            counts += f" [magenta]out of distribution {c['out_of_distribution']}[/]"
        table.add_row(
            esc(run_id),
            styled(attrs.get("status", "")),
            esc((attrs.get("backend") or {}).get("name", "")),
            esc(", ".join(attrs.get("heads") or {})),
            counts,
            esc((attrs.get("timings") or {}).get("seconds", "")),
        )
    console.print(table)
    table = Table(title="series")
    for col in ("series", "description", "orientation", "shape", "status", "outputs / reason"):
        table.add_column(col, overflow="fold")
    # the counts above come from the index; listing every group of a large store is opt-in
    shown = 0
    for key, attrs in s.iter_series():
        if limit and shown >= limit:
            table.caption = f"first {limit} series listed; mrfm inspect --limit 0 lists all"
            break
        shown += 1
        geo = attrs.get("geometry") or {}
        heads = attrs.get("heads") or {}
        outputs = sum(len(h.get("outputs") or []) for h in heads.values() if isinstance(h, dict))
        detail = attrs.get("reason") or f"{plural(outputs, 'output')} from {plural(len(heads), 'head')}"
        if (attrs.get("distribution") or {}).get("out_of_distribution"):
            detail += (
                f" (out of distribution: score {attrs['distribution']['score']} > {attrs['distribution']['threshold']})"
            )
        table.add_row(
            esc(short(key)),
            esc(attrs.get("description", "")),
            esc(geo.get("orientation", "")),
            "x".join(map(str, geo.get("shape") or [])),
            styled(attrs.get("status")),
            esc(detail),
        )
    console.print(table)
    if info.get("index"):
        source = info["index"].get("embedding_source")
        console.print(
            f"index: {esc(info['index'].get('count'))} series, "
            + (f"embeddings from {esc(source)}" if source else "no embeddings")
        )


@click.command("validate")
@click.argument("store")
@click.option("--deep", is_flag=True, help="Also read every chunk and verify its checksum.")
def validate(store, deep) -> None:
    """Check a store: schema, layout, damaged or missing chunks, incomplete series, abandoned runs.

    Exit status 0 when valid, 1 when problems were found (one line each, with its path).
    """
    from .validate import iter_problems  # loaded when the command runs (start-up time)

    problems = 0
    for p in iter_problems(store, deep=deep):  # each printed as found: a large store is never held whole
        console.print(f"[red]{esc(p)}[/]", highlight=False)
        problems += 1
    if problems:
        err_console.print(f"[red]error:[/] {problems} problem(s) in {esc(store)}", highlight=False)
        sys.exit(1)
    console.print(f"[green]{esc(store)} is valid[/]")


@click.command("search")
@click.argument("store")
@click.argument("text", required=False, callback=utf8_text)
@click.option("--like", callback=utf8_text, help="Find series similar to this series key.")
@click.option("--report", type=click.Path(exists=True, dir_okay=False), help="Find series matching a report file.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1))
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False),
    help="Model folder for encoding text (default: the store's).",
)
def search(store, text, like, report, k, model) -> None:
    """Rank the store's series by similarity to TEXT, --like SERIES or --report FILE."""
    from .search import search as run_search  # loaded when the command runs (start-up time)

    if sum(x is not None for x in (text, like, report)) != 1:
        raise click.UsageError("give exactly one of TEXT, --like or --report")
    # its errors are typed (usage 2, store 3) and mapped by the command group like every command's
    hits = run_search(store, text=text, like=like, report=report, k=k, model=model)
    table = Table(title=f"top {len(hits)}")
    for col in ("rank", "score", "series", "study", "description"):
        table.add_column(col)
    for i, h in enumerate(hits, 1):
        table.add_row(
            str(i), f"{h.score:.4f}", esc(short(h.series_key, 20)), esc(short(h.study_uid, 10)), esc(h.description)
        )
    console.print(table)
