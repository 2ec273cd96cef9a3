"""The ``mrfm`` command line. Thin: each command calls a function a Python user can call too."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__

console = Console()
err_console = Console(stderr=True)

STATUS_STYLE = {"complete": "green", "resumed": "cyan", "skipped": "yellow", "failed": "red"}


def short(uid: str, keep: int = 14) -> str:
    """The distinctive tail of a long UID-derived key, for tables."""
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


@click.group()
@click.version_option(__version__, prog_name="mrfm")
def cli() -> None:
    """mrfm: run a frozen 3D MRI foundation model and its heads over DICOM/NIfTI archives."""


# ---- run ----------------------------------------------------------------------------------------
class _Reporter:
    """Rich progress on a terminal; JSON lines on stderr otherwise (or with --log-json)."""

    def __init__(self, json_lines: bool):
        self.json_lines = json_lines
        self.progress: Progress | None = None
        self.task = None
        self.studies: dict[str, int] = {}
        self.study_total = 0
        self.done = 0
        self.t0 = time.perf_counter()

    def __call__(self, event: dict[str, Any]) -> None:
        if self.json_lines:
            sys.stderr.write(json.dumps({"time": time.time(), **event}, default=str) + "\n")
            sys.stderr.flush()
            return
        kind = event["event"]
        if kind == "warning":
            err_console.print(f"[yellow]warning:[/] {event['message']}", highlight=False)
        elif kind == "scan":
            err_console.print(f"found {event['series']} series in {event['studies']} studies; backend [bold]{event['backend']}[/] ({event['backend_reason']})", highlight=False)
            self.study_total = event["studies"]
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("studies {task.fields[studies]}"), TextColumn("{task.fields[rate]} vol/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("series", total=event["series"], studies=f"0/{self.study_total}", rate="-")
        elif kind == "series" and self.progress is not None:
            self.done += 1
            self.studies[event["study"]] = self.studies.get(event["study"], 0) + 1
            rate = self.done / max(time.perf_counter() - self.t0, 1e-6)
            self.progress.update(self.task, advance=1, studies=f"{len(self.studies)}/{self.study_total}", rate=f"{rate:.2f}")
            if event["status"] == "failed":
                self.progress.console.print(f"[red]failed[/] {event['key']}: {event['reason']}", highlight=False)
        elif kind == "done" and self.progress is not None:
            self.progress.stop()


def _summary_table(summary: Any) -> Table:
    table = Table(title=f"run {summary.run_id} -> {summary.store}  ({summary.seconds:.1f} s, backend {summary.backend})")
    for col in ("series", "description", "status", "s", "reason"):
        table.add_column(col, overflow="fold")
    for r in sorted(summary.results, key=lambda r: (r.status != "failed", r.description, r.key)):
        reason = "" if r.status == "resumed" else (r.reason or "")
        table.add_row(short(r.key), r.description, f"[{STATUS_STYLE.get(r.status, '')}]{r.status}[/]", f"{r.seconds:.1f}", reason)
    return table


def _load_job(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    from .schemas import validate

    try:
        job = json.loads(Path(path).read_text())
        validate("job", job, f"job file {path}")
    except ValueError as exc:  # JSONDecodeError is a ValueError too
        raise click.BadParameter(str(exc), param_hint="--job") from exc
    return job


@cli.command()
@click.argument("archive", nargs=-1, type=click.Path(exists=True))
@click.option("--out", "-o", type=click.Path(), help="Result store (Zarr v3 folder).")
@click.option("--heads", "heads", multiple=True, help="Heads to run (repeatable or comma-separated; default: all installed).")
@click.option("--model", type=click.Path(exists=True, file_okay=False), help="Model folder (default: the embedded model).")
@click.option("--backend", default="auto", show_default=True, help="auto, torch, onnxruntime, torch-compile, tensorrt or a plugin's backend.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--workers", type=click.IntRange(0), help="Loader processes (0 loads in-process; default: cores - 1, at most 4; 0 on two cores or fewer).")
@click.option("--query", "queries", multiple=True, help="Text query for grounding heads (repeatable).")
@click.option("--job", type=click.Path(exists=True, dir_okay=False), help="Job file (schemas/job.schema.json); options given here override it.")
@click.option("--overwrite", is_flag=True, help="Redo every series instead of resuming.")
@click.option("--log-json", is_flag=True, help="JSON-lines progress on stderr even on a terminal.")
def run(archive, out, heads, model, backend, precision, batch_size, workers, queries, job, overwrite, log_json) -> None:
    """Run the model and heads over ARCHIVE (folders, .zip files, NIfTI files) into a store.

    Exit status: 0 when every series completed, was resumed or skipped; 1 when any series
    failed (its reason is in the store and the summary); 2 for usage errors.
    """
    from .pipeline import run as run_pipeline

    spec = _load_job(job)
    paths = list(archive) or spec.get("archives", [])
    out = out or spec.get("out")
    if not paths or not out:
        raise click.UsageError("give at least one ARCHIVE and --out (or a --job file with 'archives' and 'out')")
    head_names = [h.strip() for hs in heads for h in hs.split(",") if h.strip()] or spec.get("heads") or None
    reporter = _Reporter(log_json or not sys.stderr.isatty())
    try:
        summary = run_pipeline(
            paths, out, heads=head_names, model=model or spec.get("model"), backend=backend if backend != "auto" else spec.get("backend", "auto"),
            precision=precision, batch_size=batch_size, workers=workers if workers is not None else spec.get("workers"),
            overwrite=overwrite or spec.get("overwrite", False), queries=list(queries) or spec.get("queries", []),
            params=spec.get("params"), on_event=reporter,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(_summary_table(summary))
    counts = {s: summary.count(s) for s in ("complete", "resumed", "skipped", "failed")}
    console.print(" ".join(f"[{STATUS_STYLE[s]}]{s} {n}[/]" for s, n in counts.items()))
    sys.exit(summary.exit_code)


# ---- scan / demo archive -----------------------------------------------------------------------
@cli.command()
@click.argument("archive", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def scan(archive, as_json) -> None:
    """List the studies and series found in ARCHIVE, reading headers only."""
    from .discover import scan as scan_archive

    result = scan_archive(list(archive))
    if as_json:
        click.echo(json.dumps({"series": [_ref_dict(r) for r in result.series], "warnings": result.warnings}, indent=2, default=str))
        return
    table = Table(title=f"{len(result.series)} series in {len({r.study_uid for r in result.series})} studies")
    for col in ("study", "series", "modality", "description", "dims", "slices", "orientation", "problems"):
        table.add_column(col, overflow="fold")
    for r in sorted(result.series, key=lambda r: (r.study_uid, r.series_uid)):
        dims = "x".join(str(d) for d in r.dims) if r.dims else "?"
        problems = "; ".join(r.problems)
        table.add_row(short(r.study_uid, 10), short(r.key), r.modality or "", r.description or "", dims, str(r.n_slices), r.orientation, f"[red]{problems}[/]" if problems else "")
    console.print(table)
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)


def _ref_dict(ref: Any) -> dict[str, Any]:
    return {k: getattr(ref, k) for k in ("key", "reader", "study_uid", "series_uid", "modality", "description", "dims", "n_slices", "orientation", "problems")} | {"sources": len(ref.sources)}


@cli.command("demo-archive")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--studies", default=6, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
def demo_archive(directory, studies, seed) -> None:
    """Write a synthetic multi-study MRI archive (DICOM) with ground truth beside it."""
    from .synthetic import write_demo_archive

    t = time.perf_counter()
    manifest = write_demo_archive(Path(directory), studies=studies, seed=seed)
    console.print(
        f"wrote {len(manifest.studies)} studies ({len(manifest.series)} series) in {time.perf_counter() - t:.1f} s: "
        f"DICOM in {manifest.dicom_root}, ground truth in {manifest.path.parent}\n"
        f"next: mrfm run {manifest.dicom_root} --out results.zarr", highlight=False)


# ---- plugins and heads -------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json) -> None:
    """List loaded plugins, the hooks each implements, and versions."""
    from .plugins import plugin_summaries

    rows = plugin_summaries()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="plugins")
    for col in ("name", "hooks", "source", "version"):
        table.add_column(col, overflow="fold")
    for p in rows:
        hooks = f"[red]not loaded: {p['error']}[/]" if p.get("error") else ", ".join(p["hooks"])
        version = __version__ if p["default"] else (p["version"] or "")
        table.add_row(p["name"], hooks, "default" if p["default"] else (p["package"] or "registered"), version)
    console.print(table)


@cli.group(invoke_without_command=True)
@click.pass_context
def heads(ctx) -> None:
    """List installed heads (``mrfm heads show NAME`` for one manifest)."""
    if ctx.invoked_subcommand:
        return
    from .plugins import get_head_classes

    table = Table(title="heads")
    for col in ("name", "version", "view", "features", "outputs", "plugin"):
        table.add_column(col, overflow="fold")
    for name, reg in sorted(get_head_classes().items()):
        m = reg.obj.manifest()
        outs = ", ".join(f"{o['name']} ({o['kind']})" for o in m["outputs"])
        reads = [*(["image"] if m["inputs"].get("image") else []), *m["inputs"]["features"]]
        table.add_row(name, m["version"], m["inputs"]["view"], ", ".join(reads), outs, reg.plugin)
    console.print(table)


@heads.command("show")
@click.argument("name")
def heads_show(name) -> None:
    """Print a head's manifest."""
    from .plugins import get_head_classes

    registry = get_head_classes()
    if name not in registry:
        raise click.ClickException(f"no head named {name!r}; installed: {', '.join(sorted(registry))}")
    cls = registry[name].obj
    console.print_json(json.dumps({"plugin": registry[name].plugin, "weights": str(cls.weights_path()), "manifest": cls.manifest()}))


# ---- store -------------------------------------------------------------------------------------
@cli.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect(store, as_json) -> None:
    """Summarise a result store: runs, series by status, heads, index."""
    from .store import open_store

    s = open_store(store)
    info = s.summary()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    console.print(f"[bold]{info['path']}[/]  format {info['format'].get('format_version')}  mrfm {info['format'].get('version')}")
    console.print(f"model {info['model'].get('name')} {info['model'].get('fingerprint', '')[:23]}…")
    table = Table(title="runs")
    for col in ("run", "backend", "heads", "series", "seconds"):
        table.add_column(col, overflow="fold")
    for run_id, attrs in s.runs().items():
        c = attrs.get("counts", {})
        counts = " ".join(f"[{STATUS_STYLE[k]}]{k} {c[k]}[/]" for k in STATUS_STYLE if c.get(k)) or attrs.get("status", "")
        table.add_row(run_id, attrs.get("backend", {}).get("name", ""), ", ".join(attrs.get("heads", {})), counts, str(attrs.get("timings", {}).get("seconds", "")))
    console.print(table)
    table = Table(title="series")
    for col in ("series", "description", "orientation", "shape", "status", "outputs / reason"):
        table.add_column(col, overflow="fold")
    for key, attrs in s.iter_series():
        geo = attrs.get("geometry", {})
        outputs = sum(len(h.get("outputs", [])) for h in attrs.get("heads", {}).values())
        detail = attrs.get("reason") or f"{outputs} outputs from {len(attrs.get('heads', {}))} heads"
        table.add_row(short(key), attrs.get("description", ""), geo.get("orientation", ""), "x".join(map(str, geo.get("shape", []))), f"[{STATUS_STYLE.get(attrs.get('status'), '')}]{attrs.get('status')}[/]", detail)
    console.print(table)
    if info["index"]:
        console.print(f"index: {info['index'].get('count')} series, embeddings from {info['index'].get('embedding_source')}")


@cli.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
def validate(store) -> None:
    """Check a store against schemas/store.schema.json; report every violation with its path."""
    from .validate import validate_store

    problems = validate_store(store)
    for p in problems:
        console.print(f"[red]{p}[/]", highlight=False)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {store}")
    console.print(f"[green]{store} is valid[/]")


@cli.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("text", required=False)
@click.option("--like", help="Find series similar to this series key.")
@click.option("--report", type=click.Path(exists=True, dir_okay=False), help="Find series matching a report file.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1))
@click.option("--model", type=click.Path(exists=True, file_okay=False), help="Model folder for encoding text (default: the store's).")
def search(store, text, like, report, k, model) -> None:
    """Rank the store's series by similarity to TEXT, --like SERIES or --report FILE."""
    from .search import search as run_search

    if sum(x is not None for x in (text, like, report)) != 1:
        raise click.UsageError("give exactly one of TEXT, --like or --report")
    try:
        hits = run_search(store, text=text, like=like, report=report, k=k, model=model)
    except (KeyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    table = Table(title=f"top {len(hits)}")
    for col in ("rank", "score", "series", "study", "description"):
        table.add_column(col)
    for i, h in enumerate(hits, 1):
        table.add_row(str(i), f"{h.score:.4f}", short(h.series_key, 20), short(h.study_uid, 10), h.description)
    console.print(table)


@cli.command("compile")
@click.option("--backend", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--max-batch", default=4, show_default=True, type=click.IntRange(1))
@click.option("--model", type=click.Path(exists=True, file_okay=False))
def compile_cmd(backend, precision, max_batch, model) -> None:
    """Build the compiled encoder ahead of time and print what was built and where."""
    from .backends import compile_backend
    from .model import load_model

    info = compile_backend(load_model(model), backend=backend, precision=precision, max_batch=max_batch)
    console.print_json(json.dumps(info, default=str))


def _register_plugin_commands() -> None:
    from .plugins import load_plugins, pm

    load_plugins()
    pm.hook.register_commands(cli=cli)


_register_plugin_commands()
