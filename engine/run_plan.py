"""One shape for a run's options: :class:`RunPlan`.

Command-line flags, a job file (``schemas/job.schema.json``) and Python keyword arguments all
become a plan through one function, :func:`make_plan`, which validates them once (every mistake a
:class:`~engine.errors.UsageError` naming the option) before anything is loaded or written. The
driver (:func:`engine.pipeline.run`) and every executor read the same frozen plan.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .bounded_read import read_text_file
from .errors import UsageError
from .memory_budget import resolve
from .schemas import validate
from .sources import SourceOptions, parse_where
from .store import is_remote
from .user_text import utf8_text

PRECISIONS = ("fp32", "bf16", "fp16")
EXECUTORS = ("local", "ray")
# job-file keys that a plan names otherwise (the job file follows the command line's flags)
JOB_ALIASES = {"to": "export_to"}


@dataclass(frozen=True)
class RunPlan:
    """Everything a run was asked to do; picklable, so it can travel to workers."""

    archives: tuple[str, ...]  # folders, .zip or NIfTI files, or PACS URLs, as given
    out: str
    heads: tuple[str, ...] | None = None  # None: every installed head
    model: str | None = None  # None: the embedded model
    backend: str = "auto"
    precision: str = "fp32"
    batch_size: int = 4
    workers: int | None = None  # None: measured on the first batch
    overwrite: bool = False
    queries: tuple[str, ...] = ()
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    record_paths: bool = False
    budgets: Mapping[str, float] | None = None
    default_budget: float | None = None
    exports: tuple[str, ...] = ()
    export_dir: str | None = None
    export_to: str | None = None
    executor: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None
    force: bool = False
    max_series_bytes: int = 0  # resolved: the default budget when none was given
    sources: SourceOptions = field(default_factory=SourceOptions)


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(RunPlan)) | {"where", "ae_title", "move", "move_port"}


def make_plan(job: Mapping[str, Any] | str | Path | None = None, **options: Any) -> RunPlan:
    """The plan for ``options`` (keyword arguments named as :class:`RunPlan`'s fields, plus the
    source options ``where``, ``ae_title``, ``move`` and ``move_port``) over a job file's keys.

    ``job`` is a job file's path or its parsed content; an option that is None is not given and
    takes the job file's value, then the default. Raises UsageError for anything a run cannot
    start with.
    """
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"make_plan() got unknown option(s) {', '.join(unknown)}")
    spec = {JOB_ALIASES.get(k, k): v for k, v in (load_job(job) if isinstance(job, (str, Path)) else job or {}).items()}
    given = {**spec, **{k: v for k, v in options.items() if v is not None}}

    archives = tuple(str(a) for a in given.get("archives") or ())
    out = given.get("out")
    if not archives or not out:
        raise UsageError("give at least one ARCHIVE and --out (or a --job file with 'archives' and 'out')")
    heads = given.get("heads")
    if heads is not None:
        heads = tuple(heads)
        if not heads:
            raise UsageError(
                "--heads names no head; give head names (comma-separated), or leave --heads out to run every installed head"
            )
    precision = given.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    batch_size = given.get("batch_size", 4)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: give a whole number of at least 1")
    workers = given.get("workers")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise UsageError(f"--workers {workers}: give a whole number of at least 0")
    executor = given.get("executor", "local")
    if executor not in EXECUTORS:
        raise UsageError(f"--executor {executor}: unknown; choose one of {', '.join(EXECUTORS)}")
    exports = tuple(given.get("exports") or ())
    export_to, export_dir = given.get("export_to"), given.get("export_dir")
    if export_to and not exports:
        raise UsageError(f"--to {export_to}: name what to send with --export dicom-seg or --export dicom-sr")
    if exports and is_remote(out) and not export_dir:
        raise UsageError(f"--export with a store at {out}: give --export-dir (exports are written to local files)")
    sources = given.get("sources") or SourceOptions()
    where = given.get("where")
    sources = dataclasses.replace(
        sources,
        where=_where_pairs(where) if where is not None else sources.where,
        **{k: given[k] for k in ("ae_title", "move", "move_port") if k in given},
    )
    model = given.get("model")
    return RunPlan(
        archives=archives,
        out=str(out),
        heads=heads,
        model=None if model is None else str(model),
        backend=given.get("backend", "auto"),
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        overwrite=bool(given.get("overwrite", False)),
        queries=tuple(utf8_text(q, "query") for q in given.get("queries") or ()),  # bytes from a caller: UsageError
        params={k: dict(v) for k, v in (given.get("params") or {}).items()},
        record_paths=bool(given.get("record_paths", False)),
        budgets=dict(given["budgets"]) if given.get("budgets") else None,
        default_budget=given.get("default_budget"),
        exports=exports,
        export_dir=None if export_dir is None else str(export_dir),
        export_to=export_to,
        executor=executor,
        ray_address=given.get("ray_address"),
        ray_actors=given.get("ray_actors"),
        force=bool(given.get("force", False)),
        max_series_bytes=resolve(given.get("max_series_bytes")),  # a bad size is a UsageError here
        sources=sources,
    )


def _where_pairs(where: Any) -> tuple[tuple[str, str], ...]:
    """``--where`` as given on the command line (KEYWORD=VALUE strings), as a job file's object
    (keyword -> value), or as pairs already parsed."""
    if isinstance(where, Mapping):
        return parse_where(f"{k}={v}" for k, v in where.items())
    items = list(where)
    if all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
        return tuple((str(k), str(v)) for k, v in items)
    return parse_where(items)


def load_job(path: str | Path) -> dict[str, Any]:
    """A job file's content, checked against ``schemas/job.schema.json``."""

    try:
        job = json.loads(read_text_file(path, what="job file"))  # a regular file under a size cap
        validate("job", job, f"job file {path}")
    except ValueError as exc:  # JSONDecodeError is a ValueError too
        raise UsageError(f"--job: {exc}") from exc
    return job


# ---- from the command line -----------------------------------------------------------------------
def head_names(heads: Iterable[str]) -> list[str] | None:
    """Names from repeatable, comma-separated ``--heads``; None when not given; an empty
    ``--heads ''`` is a usage error, not 'every head'."""
    heads = tuple(heads)
    names = [h.strip() for hs in heads for h in hs.split(",") if h.strip()]
    if heads and not names:
        raise UsageError(
            "--heads names no head; give head names (comma-separated), or leave --heads out to run every installed head"
        )
    return names or None


def head_budgets(items: Iterable[str]) -> dict[str, float]:
    """``--head-budget HEAD=SECONDS`` (repeatable) -> {head: seconds}."""
    out = {}
    for item in items:
        name, _, seconds = item.partition("=")
        try:
            out[name.strip()] = float(seconds)
        except ValueError:
            raise UsageError(f"--head-budget {item!r} is not HEAD=SECONDS") from None
        if not name.strip() or out[name.strip()] <= 0:
            raise UsageError(f"--head-budget {item!r} is not HEAD=SECONDS with SECONDS > 0")
    return out


def plan_from_flags(flags: Mapping[str, Any]) -> RunPlan:
    """The plan for ``mrfm run``'s flags; ``flags`` holds only those given on the command line
    (click's parameter names), so a job file's value stands where a flag is left out."""
    f = dict(flags)
    options: dict[str, Any] = {
        "archives": f.pop("archive", None) or None,
        "heads": head_names(f.pop("heads")) if "heads" in f else None,
        "budgets": head_budgets(f.pop("head_budgets")) or None if "head_budgets" in f else None,
        "default_budget": f.pop("default_head_budget", None),
        "exports": [e for es in f.pop("exports", ()) for e in es.split(",") if e] or None,
        "where": f.pop("where", None) or None,
        "queries": f.pop("queries", None) or None,
    }
    job = f.pop("job", None)
    return make_plan(job, **options, **{k: v for k, v in f.items() if k in OPTION_NAMES})
