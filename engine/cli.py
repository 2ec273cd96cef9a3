"""The ``mrfm`` command line. Thin: each command calls a function a Python user can call too."""

from __future__ import annotations

import importlib
import json
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._version import __version__
from .errors import EXIT_INTERRUPTED, MrfmError
from .plugins import disable, get_broken_heads, get_head_classes, load_plugins, plugin_summaries, pm
from .termination import TERM

# shared with the commands loaded on demand (engine.cli_shared); re-exported under their old names
from .cli_shared import STATUS_STYLE as STATUS_STYLE
from .cli_shared import console as console
from .cli_shared import err_console as err_console
from .cli_shared import esc as esc
from .cli_shared import open_existing as _open_existing  # noqa: F401 (show and report import it from here)
from .cli_shared import plural as _plural
from .cli_shared import short as short
from .cli_shared import styled as styled
from .cli_shared import utf8_text as _utf8


class _Cli(click.Group):
    """Expected errors (``engine.errors``) become one line and their exit code; a traceback is
    shown only with ``--debug`` (or for a bug, which is not an expected error).

    Commands whose code lives beside the runtime (export, bench, the fitting library) are
    imported only when invoked, so ``mrfm run`` never loads them."""

    lazy = {
        "export": "engine.export:export_command",
        "bench": "engine.bench:bench",
        "fit": "engine.fitting.cli:fit_command",
        "fit-temperature": "engine.fitting.cli:fit_temperature_command",
        "evaluate": "engine.fitting.cli:evaluate_command",
        "model": "engine.fitting.cli:model_group",
        "store": "engine.store_cli:store",
        "inspect": "engine.store_cli:inspect",
        "validate": "engine.store_cli:validate",
        "search": "engine.store_cli:search",
        "show": "engine.show:show_command",
        "report": "engine.report_cli:report_command",
        "listen": "engine.listen:listen_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands or name not in self.lazy:
            return super().get_command(ctx, name)
        module, attr = self.lazy[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = sys.argv[1:] if args is None else list(args)
        if "--debug" not in argv:  # plugins may load while the command line is parsed
            _plain_warnings()
        with TERM:  # SIGTERM ends as documented (130, or the run's own code once it has ended)
            return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MrfmError as exc:
            if ctx.meta.get("mrfm.debug"):
                raise
            err_console.print(f"[red]error:[/] {esc(exc)}", highlight=False)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]", highlight=False)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=_Cli)
@click.version_option(__version__, prog_name="mrfm")
@click.option("--debug", is_flag=True, help="Show tracebacks for expected errors too.")
@click.option(
    "--disable-plugins", metavar="NAMES", help="Comma-separated plugins to leave out (as MRFM_DISABLE_PLUGINS)."
)
@click.pass_context
def cli(ctx, debug, disable_plugins) -> None:
    """mrfm: run a frozen 3D MRI foundation model and its heads over DICOM/NIfTI archives.

    Exit status: 0 done; 1 some series failed; 2 usage or configuration error (including no
    series found); 3 result store locked or unusable; 130 interrupted.
    """
    ctx.meta["mrfm.debug"] = debug
    if disable_plugins:
        disable(disable_plugins.split(","))


def _plain_warnings() -> None:
    """Library warnings (a plugin that could not be loaded, ...) as one ``warning:`` line each,
    not Python's file:line form that quotes engine source."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        err_console.print(f"[yellow]warning:[/] {esc(str(message))}", highlight=False)

    warnings.showwarning = show


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
            err_console.print(f"[yellow]warning:[/] {esc(event['message'])}", highlight=False)
        elif kind == "scan":
            skipped = f", {event['skipped_files']} file(s) skipped (see warnings)" if event.get("skipped_files") else ""
            found = (
                "listing series as the PACS answers"
                if event["series"] is None
                else f"found {event['series']} series in {event['studies']} studies"
            )
            err_console.print(
                f"{found}{skipped}; backend [bold]{esc(event['backend'])}[/] ({esc(event['backend_reason'])})",
                highlight=False,
            )
            self.study_total = "?" if event["studies"] is None else event["studies"]
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("studies {task.fields[studies]}"),
                TextColumn("{task.fields[rate]} vol/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "series", total=event["series"], studies=f"0/{self.study_total}", rate="-"
            )
        elif kind == "head" and self.progress is not None:
            # a slow or stuck head is visible: the bar names the head and batch being run
            if event.get("state") == "started":
                self.progress.update(self.task, description=f"{esc(event['head'])} batch {event.get('batch')}")
            elif event.get("state") in ("failed", "over budget"):
                self.progress.console.print(
                    f"[red]{esc(event['state'])}[/] {esc(event.get('reason') or event['head'])}", highlight=False
                )
            else:
                self.progress.update(self.task, description="series")
        elif kind == "series" and self.progress is not None:
            self.done += 1
            self.studies[event["study"]] = self.studies.get(event["study"], 0) + 1
            rate = self.done / max(time.perf_counter() - self.t0, 1e-6)
            self.progress.update(
                self.task, advance=1, studies=f"{len(self.studies)}/{self.study_total}", rate=f"{rate:.2f}"
            )
            if event["status"] == "failed":
                self.progress.console.print(
                    f"[red]failed[/] {esc(event['key'])}: {esc(event['reason'])}", highlight=False
                )
        elif kind == "done":
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _summary_table(summary: Any) -> Table:
    table = Table(
        title=esc(f"run {summary.run_id} -> {summary.store}  ({summary.seconds:.1f} s, backend {summary.backend})")
    )
    for col in ("series", "description", "status", "s", "reason"):
        table.add_column(col, overflow="fold")
    for r in sorted(summary.results, key=lambda r: (r.status != "failed", r.description, r.key)):
        reason = "" if r.status == "resumed" else (r.reason or "")
        table.add_row(esc(short(r.key)), esc(r.description), styled(r.status), f"{r.seconds:.1f}", esc(reason))
    return table


MAX_SERIES_BYTES_HELP = (
    "Memory budget for decoding one series, e.g. 2GiB or 512MiB (default: min(2 GiB, a quarter of RAM)); "
    "a series whose headers declare more fails, a file that inflates past it is skipped."
)


class _Archive(click.ParamType):
    """A path that exists, or a PACS URL (checked by the source that claims it)."""

    name = "archive"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return value if "://" in str(value) else click.Path(exists=True).convert(value, param, ctx)


@cli.command()
@click.argument("archive", nargs=-1, type=_Archive())
@click.option("--out", "-o", type=click.Path(), help="Result store (Zarr v3 folder).")
@click.option(
    "--heads",
    "heads",
    multiple=True,
    callback=_utf8,
    help="Heads to run (repeatable or comma-separated; default: all installed).",
)
@click.option(
    "--model", type=click.Path(exists=True, file_okay=False), help="Model folder (default: the embedded model)."
)
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="auto, torch, onnxruntime, torch-compile, tensorrt or a plugin's backend.",
)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option(
    "--workers",
    type=click.IntRange(0),
    help="Loader processes (0 loads in-process; default: measured on the first batch, as many as keep the encoder fed, up to cores - 1; none on two cores or fewer).",
)
@click.option("--query", "queries", multiple=True, callback=_utf8, help="Text query for grounding heads (repeatable).")
@click.option(
    "--job",
    type=click.Path(exists=True, dir_okay=False),
    help="Job file (schemas/job.schema.json); options given here override it.",
)
@click.option("--overwrite", is_flag=True, help="Redo every series instead of resuming.")
@click.option(
    "--record-paths",
    is_flag=True,
    help="Record source file paths in the store (off: files are named by archive and index).",
)
@click.option(
    "--head-budget",
    "head_budgets",
    multiple=True,
    metavar="HEAD=SECONDS",
    help="Time limit for one predict call of a head (repeatable); overrides its manifest.",
)
@click.option(
    "--default-head-budget",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Time limit for heads whose manifest declares none.",
)
@click.option(
    "--export",
    "exports",
    multiple=True,
    metavar="FORMAT",
    help="Export each series as it completes (repeatable): dicom-seg, dicom-sr, nifti, ome-zarr, table.",
)
@click.option(
    "--export-dir",
    type=click.Path(file_okay=False),
    help="Where exports go (default: <out>-<format> beside the store).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    help="Where the stages run: local (default) or ray (a Ray cluster; pip install 'mrfm[ray]').",
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    help="Ray cluster to run on (auto: the one `ray start` joined this machine to; default: start one here).",
)
@click.option(
    "--ray-actors",
    type=click.IntRange(1),
    metavar="N",
    help="Inference actors on Ray (default: one per GPU, or one per two CPUs where there is none).",
)
@click.option(
    "--force", is_flag=True, help="Run heads named in --heads even if they were fit on another encoder (recorded)."
)
@click.option("--max-series-bytes", metavar="SIZE", help=MAX_SERIES_BYTES_HELP)
@click.option("--log-json", is_flag=True, help="JSON-lines progress on stderr even on a terminal.")
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="KEYWORD=VALUE",
    help="PACS query key (repeatable), e.g. Modality=MR, StudyDate=20240101-20241231, StudyInstanceUID=...",
)
@click.option("--ae-title", default="MRFM", show_default=True, help="Calling AE title for dimse:// sources and --to.")
@click.option("--move", is_flag=True, help="dimse://: fetch with C-MOVE to mrfm's own storage SCP instead of C-GET.")
@click.option(
    "--move-port",
    default=11113,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of that storage SCP (the PACS must know --ae-title at this host and port).",
)
@click.option(
    "--to",
    "export_to",
    metavar="URL",
    help="Send each --export (dicom-seg, dicom-sr) to a PACS as its series completes: dicomweb+http(s)://... or dimse://AE@host:port.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    help="Keep an HTML report of the store in this folder, updated as series complete.",
)
def run(log_json, report_dir, **flags) -> None:
    """Run the model and heads over ARCHIVE (folders, .zip files, NIfTI files) into a store.

    Exit status: 0 when every series completed, was resumed or skipped; 1 when any series
    failed (its reason is in the store and the summary); 2 for usage errors, including an
    archive with no series; 3 when the store is locked by another run or unusable; 130 when
    interrupted (the series in flight are finished first; rerun to resume).
    """
    from .pipeline import execute_plan  # loaded when the command runs (start-up time)
    from .run_plan import plan_from_flags  # loaded when the command runs (start-up time)

    ctx = click.get_current_context()
    # only the flags given here: a job file's value stands where a flag is left out
    plan = plan_from_flags(
        {k: v for k, v in flags.items() if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    )
    out = plan.out
    reporter = _Reporter(log_json or not sys.stderr.isatty())
    live = None
    if report_dir:
        from .report import LiveReport  # loaded when the command runs (start-up time)

        live = LiveReport(str(out), report_dir)

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "scan":  # the run has begun: the pipeline's own handler takes over
            TERM.begun()
        reporter(event)
        if live is not None:
            live(event)

    try:
        summary = execute_plan(plan, on_event=on_event)
    finally:
        reporter.close()
        if live is not None and live.writer is not None:
            live.close()
            for problem in live.errors[:5]:
                err_console.print(f"[yellow]warning:[/] {esc(problem)}", highlight=False)
    console.print(_summary_table(summary))
    counts = {s: summary.count(s) for s in ("complete", "resumed", "skipped", "failed")}
    line = " ".join(f"[{STATUS_STYLE[s]}]{s} {n}[/]" for s, n in counts.items())
    if summary.skipped_files:
        line += (
            f"  [yellow]files skipped {summary.skipped_files}[/] (reasons in the warnings above and in the run record)"
        )
    if summary.out_of_distribution:
        line += f"  [magenta]out of distribution {summary.out_of_distribution}[/] (outputs written; unlike the model's training data)"
    if summary.interrupted:
        line += "  [yellow]interrupted[/]: rerun the same command to resume"
    console.print(line)
    sys.exit(summary.exit_code)


# ---- scan / demo archive -----------------------------------------------------------------------
@cli.command()
@click.argument("archive", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--record-paths", is_flag=True, help="Name files by their paths instead of archive and index.")
@click.option("--max-series-bytes", metavar="SIZE", help=MAX_SERIES_BYTES_HELP)
def scan(archive, as_json, record_paths, max_series_bytes) -> None:
    """List the studies and series found in ARCHIVE, reading headers only."""
    from .discover import scan as scan_archive  # loaded when the command runs (start-up time)

    result = scan_archive(
        list(archive), max_series_bytes=max_series_bytes, **({"record_paths": True} if record_paths else {})
    )
    skipped = [{"source": k.source, "kind": k.kind, "reason": k.reason} for k in getattr(result, "skipped", [])]
    if as_json:
        click.echo(
            json.dumps(
                {"series": [_ref_dict(r) for r in result.series], "skipped": skipped, "warnings": result.warnings},
                indent=2,
                default=str,
            )
        )
        return
    table = Table(title=f"{len(result.series)} series in {len({r.study_uid for r in result.series})} studies")
    for col in ("study", "series", "modality", "description", "dims", "slices", "orientation", "problems"):
        table.add_column(col, overflow="fold")
    for r in sorted(result.series, key=lambda r: (r.study_uid, r.series_uid)):
        dims = "x".join(str(d) for d in r.dims) if r.dims else "?"
        problems = "; ".join(r.problems)
        table.add_row(
            esc(short(r.study_uid, 10)),
            esc(short(r.key)),
            esc(r.modality),
            esc(r.description),
            dims,
            str(r.n_slices),
            esc(r.orientation),
            f"[red]{esc(problems)}[/]" if problems else "",
        )
    from .dicom.patient_identifiers import PHI_RULE  # loaded when the command runs (start-up time)

    table.caption = f"descriptions: {esc(PHI_RULE)}"
    console.print(table)
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {esc(w)}", highlight=False)
    if skipped:
        err_console.print(f"[yellow]{len(skipped)} file(s) skipped[/] (reasons above)", highlight=False)


def _ref_dict(ref: Any) -> dict[str, Any]:
    return {
        k: getattr(ref, k)
        for k in (
            "key",
            "reader",
            "study_uid",
            "series_uid",
            "modality",
            "description",
            "dims",
            "n_slices",
            "orientation",
            "problems",
        )
    } | {"sources": len(ref.sources)}


@cli.command("demo-archive")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--studies", default=6, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
def demo_archive(directory, studies, seed) -> None:
    """Write a synthetic multi-study MRI archive (DICOM) with ground truth beside it."""
    from .synthetic import write_demo_archive  # loaded when the command runs (start-up time)

    t = time.perf_counter()
    manifest = write_demo_archive(Path(directory), studies=studies, seed=seed)
    # plain text: paths may hold brackets, and a command to copy must not be wrapped
    click.echo(
        f"wrote {_plural(len(manifest.studies), 'study', 'studies')} ({len(manifest.series)} series) in {time.perf_counter() - t:.1f} s: "
        f"DICOM in {manifest.dicom_root}, ground truth in {manifest.path.parent}\n"
        f"next: mrfm run {shlex.quote(str(manifest.dicom_root))} --out results.zarr"
    )


# ---- plugins and heads -------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json) -> None:
    """List plugins, the hooks each implements, versions, and what is broken or disabled."""
    rows = plugin_summaries()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="plugins")
    for col in ("name", "hooks", "source", "version"):
        table.add_column(col, overflow="fold")
    for p in rows:
        if p.get("disabled"):
            hooks = "[yellow]disabled[/]"
        elif p.get("error"):
            hooks = f"[red]broken: {esc(p['error'])}[/]"
        else:
            hooks = esc(", ".join(p["hooks"]))
        for head, reason in sorted(p.get("broken", {}).items()):
            hooks += f"\n[red]broken head {esc(head)}: {esc(reason)}[/]"
        version = __version__ if p["default"] else (p["version"] or "")
        table.add_row(
            esc(p["name"]), hooks, esc("default" if p["default"] else (p["package"] or "registered")), esc(version)
        )
    console.print(table)


@cli.group(invoke_without_command=True)
@click.pass_context
def heads(ctx) -> None:
    """List installed heads, broken ones with the reason (``mrfm heads show NAME`` for one)."""
    if ctx.invoked_subcommand:
        return
    table = Table(title="heads")
    for col in ("name", "version", "view", "features", "outputs", "plugin"):
        table.add_column(col, overflow="fold")
    for name, reg in sorted(get_head_classes().items()):
        m = reg.obj.manifest()
        outs = ", ".join(f"{o['name']} ({o['kind']})" for o in m["outputs"])
        reads = [*(["image"] if m["inputs"].get("image") else []), *m["inputs"]["features"]]
        table.add_row(
            esc(name), esc(m["version"]), esc(m["inputs"]["view"]), esc(", ".join(reads)), esc(outs), esc(reg.plugin)
        )
    for name, b in sorted(get_broken_heads().items()):
        table.add_row(esc(name), "[red]broken[/]", "", "", f"[red]{esc(b.reason)}[/]", esc(b.plugin))
    console.print(table)


@heads.command("show")
@click.argument("name")
def heads_show(name) -> None:
    """Print a head's manifest (or why it is broken)."""
    registry = get_head_classes()
    broken = get_broken_heads()
    if name in broken:
        console.print_json(json.dumps({"plugin": broken[name].plugin, "broken": broken[name].reason}))
        return
    if name not in registry:
        raise click.UsageError(f"no head named {name!r}; installed: {', '.join(sorted(registry))}")
    cls = registry[name].obj
    console.print_json(
        json.dumps({"plugin": registry[name].plugin, "weights": str(cls.weights_path()), "manifest": cls.manifest()})
    )


@cli.command("new-head")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder to create the package folder NAME in.",
)
def new_head(name, directory) -> None:
    """Write a ready head package: pyproject with the entry point, manifest, head, README, test."""
    from .templates import new_head_package  # loaded when the command runs (start-up time)

    folder = new_head_package(name, directory)
    # plain text: a command to copy must not be wrapped or shortened
    click.echo(f"wrote {folder}\nnext: pip install -e '{folder}[test]' && pytest {folder}")


@cli.command("compile")
@click.option("--backend", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--max-batch", default=4, show_default=True, type=click.IntRange(1))
@click.option("--model", type=click.Path(exists=True, file_okay=False))
def compile_cmd(backend, precision, max_batch, model) -> None:
    """Build the compiled encoder ahead of time and print what was built and where."""
    from .backends import compile_backend  # loaded when the command runs (start-up time)
    from .model import load_model  # loaded when the command runs (start-up time)

    info = compile_backend(load_model(model), backend=backend, precision=precision, max_batch=max_batch)
    console.print_json(json.dumps(info, default=str))


def _register_plugin_commands() -> None:
    with warnings.catch_warnings(record=True) as caught:  # a plugin that cannot load: one plain line
        warnings.simplefilter("always")
        load_plugins()
        pm.hook.register_commands(cli=cli)
    for w in caught:
        if "--debug" in sys.argv:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            err_console.print(f"[yellow]warning:[/] {esc(str(w.message))}", highlight=False)


def __getattr__(name: str) -> Any:
    """``engine.cli.inspect``/``validate``/``search`` still import: they live in engine.store_cli
    now, loaded on first use (importing them here would load the store on every start)."""
    if name in ("inspect", "validate", "search"):
        module, attr = _Cli.lazy[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register_plugin_commands()
