"""The streaming pipeline behind ``mrfm run``: the run's driver.

The driver sets up the model and heads, scans, holds the store's lock, triages for resume, hands
the series still to do to an executor (``local``: loader processes -> this process, which owns
the accelerator -> writer thread; ``ray``: a Ray cluster, see engine.executors) and writes the run
record and the index. Bounded queues between the stages keep memory flat and let decoding,
inference and writing overlap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ._version import __version__
from .enums import DONE_STATUSES, RESULT_STATUSES
from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SERIES_FAILED, MrfmError, StoreError, UsageError
from .executors import Driver, Executor, StagePlan, Work, get_executor, local_where
from .executors.local import default_workers, workers_for
from .executors.stages import SeriesResult, WriteItem, fingerprints, prepare_run, result_for, safe_attrs, write_item
from .disk_full import disk_full, disk_full_is_store_error, no_space
from .faults import killpoint
from .inference import Inference
from .distribution import distribution_for
from .run_exports import check_exporters, close_export, export_series, local_path, open_export_sessions
from .run_plan import RunPlan, make_plan
from .series_ref import SeriesRef
from .series_stream import SeriesStream
from .sources import archive_labels, changed_at_source, find, is_url
from .store import ResultStore, is_remote, now

Event = dict[str, Any]
__all__ = [
    "RunPlan",
    "RunSummary",
    "SeriesResult",
    "default_workers",
    "execute_plan",
    "make_plan",
    "run",
    "workers_for",
]


@dataclass
class RunSummary:
    run_id: str
    store: str
    backend: str
    backend_reason: str
    results: list[SeriesResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped_files: int = 0
    interrupted: bool = False
    workers: int = 0
    seconds: float = 0.0
    executor: dict[str, Any] = field(default_factory=dict)  # what ran the stages: name, nodes, actors
    stages: dict[str, float] = field(
        default_factory=lambda: {"load": 0.0, "wait_for_load": 0.0, "infer": 0.0, "write": 0.0}
    )
    query_incomplete: bool = False  # a PACS query stopped before its end: the series not listed wait for a rerun

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def out_of_distribution(self) -> int:
        """Series this run scored as unlike the model's training data (their outputs are written)."""
        return sum(r.out_of_distribution is True for r in self.results)

    @property
    def exit_code(self) -> int:
        """130 when interrupted, 1 when any series failed, else 0 (documented in the README)."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SERIES_FAILED if self.count("failed") or self.query_incomplete else EXIT_OK


class _StopFlag:
    """SIGINT/SIGTERM ask the run to stop: the series in flight are finished and written, the run
    is marked ``interrupted``. A second signal stops at once (the next run finds it abandoned)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopFlag"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; a caller's thread runs unstoppable
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            self.restore()

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def run(
    paths: Iterable[str | Path],
    out: str | Path,
    *,
    heads: list[str] | None = None,
    model: str | Path | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    batch_size: int = 4,
    workers: int | None = None,
    overwrite: bool = False,
    queries: list[str] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    record_paths: bool = False,
    budgets: dict[str, float] | None = None,
    default_budget: float | None = None,
    exports: list[str] | None = None,
    export_dir: str | Path | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    force: bool = False,
    max_series_bytes: int | str | None = None,
    on_event: Callable[[Event], None] | None = None,
    sources: Any = None,
    export_to: str | None = None,
) -> RunSummary:
    """Run the model and heads over every series found under ``paths`` into the store ``out``.

    Resume is the default: a series is skipped when every selected head is done on it with a
    matching fingerprint (model, head, preprocessing, parameters) and its group is intact;
    otherwise it is redone and outputs of other heads already in the store are kept.
    ``overwrite=True`` redoes everything. Bad input is recorded on its series and never ends
    the run. Raises :class:`~engine.errors.UsageError` (bad options, no series found),
    :class:`~engine.errors.BackendUnavailable` and :class:`~engine.errors.StoreError`
    (:class:`~engine.errors.StoreLocked` when another run holds the store) before writing
    anything. SIGINT/SIGTERM finish the series in flight and return a summary marked
    ``interrupted``. No file-system path below the archive roots is stored unless
    ``record_paths`` is set. ``budgets`` (head name -> seconds per predict call) override the
    heads' manifests; ``default_budget`` applies to heads that declare none. ``exports`` names
    exporters (``mrfm export`` formats) that write each series as it completes, into
    ``export_dir/<format>`` (default: ``<out>-<format>`` beside the store); an export failure is a
    warning, never the run's failure.

    ``executor`` says where the stages run: ``local`` (this machine) or ``ray`` (a Ray cluster at
    ``ray_address``, default: a Ray instance started here; ``ray_actors`` inference actors,
    default: one per GPU, or one per two CPUs where there is none). Either way each series
    records ``executor``, ``node`` and ``actor``, and the run record says what ran the run.
    ``force`` runs heads named in ``heads`` although they were fit on another encoder; the run
    record's warnings say so. ``max_series_bytes`` (bytes, or a size such as ``"2GiB"``) is
    the per-series memory budget (:mod:`engine.memory_budget`; default min(2 GiB, a quarter of
    RAM)), checked against each series' declared size before decoding: a series over it fails
    with "needs N GiB, budget M GiB".

    An archive may be a PACS URL (``dicomweb+http(s)://``, ``dimse://``; see engine.sources):
    ``sources`` (:class:`~engine.sources.SourceOptions`) carries the query (``where``) and DIMSE
    options; each series is fetched when its loader reaches it. ``export_to`` sends each export
    (SEG, SR) to a PACS URL as the series completes.
    """
    options = {k: v for k, v in locals().items() if k not in ("paths", "out", "on_event")}
    return execute_plan(make_plan(archives=[str(p) for p in paths], out=str(out), **options), on_event=on_event)


@dataclass
class _Run:
    """One run while the store's lock is held: what set-up built, and what the run found."""

    stage: StagePlan
    runner: Executor
    executor_info: dict[str, Any]
    found: Any  # the ScanResult
    store: ResultStore
    inference: Inference
    mdl: Any
    enc: Any
    reason: str  # why this backend
    head_info: list[dict[str, Any]]
    params: dict[str, dict[str, Any]]  # as the heads took them (loading adds what they read, such as queries)
    warnings: list[str]
    started: str
    t0: float
    stop: "_StopFlag"
    emit: Callable[[Event], None]

    @property
    def refs(self) -> list[SeriesRef] | SeriesStream:
        series = self.found.series
        return series if isinstance(series, SeriesStream) else list(series)  # a PACS query streams

    @property
    def skipped_files(self) -> int:
        return len(getattr(self.found, "skipped", []) or [])


def execute_plan(plan: RunPlan, on_event: Callable[[Event], None] | None = None) -> RunSummary:
    """Run a :class:`~engine.run_plan.RunPlan` (what :func:`run` does with its arguments)."""
    emit = on_event or (lambda e: None)
    paths: list[str | Path] = [p if is_url(p) else Path(p) for p in plan.archives]
    started, t0 = now(), time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
    runner = get_executor(
        plan.executor, ray_address=plan.ray_address, ray_actors=plan.ray_actors
    )  # UsageError when not installed

    params = {k: dict(v) for k, v in plan.params.items()}
    mdl, enc, reason, loaded, text, warnings = prepare_run(
        plan.model,
        plan.backend,
        plan.precision,
        plan.batch_size,
        None if plan.heads is None else list(plan.heads),
        params,
        list(plan.queries),
        plan.force,
    )
    # each head's fingerprint covers its manifest, weights, parameters and code
    head_info, fingerprint, head_fps = fingerprints(mdl, loaded, params)
    distribution, unscored = distribution_for(mdl)
    warnings.extend(unscored)
    inference = Inference(
        enc,
        loaded,
        text,
        plan.batch_size,
        budgets=dict(plan.budgets) if plan.budgets else None,
        default_budget=plan.default_budget,
        on_event=emit,
        distribution=distribution,
    )

    killpoint("start-up")
    options = dataclasses.replace(plan.sources, record_paths=plan.record_paths, max_series_bytes=plan.max_series_bytes)
    found = find(paths, options)
    if plan.workers is None and any(is_url(p) for p in paths):
        # fetching is network-bound: loader threads, and one C-MOVE listener per process
        plan = dataclasses.replace(plan, workers=0)
    if not found.series:  # a PACS query's stream: whether its first page lists any
        skipped_files = len(getattr(found, "skipped", []) or [])
        detail = f"; {skipped_files} file(s) skipped: " + "; ".join(found.warnings[:5]) if found.warnings else ""
        raise UsageError(f"no DICOM or NIfTI series found under {', '.join(archive_labels(paths))}{detail}")

    check_exporters(list(plan.exports))
    # workers rebuild the model and heads from the plan; the embedded model is each node's own
    stage = StagePlan(
        plan, run_id, fingerprint, head_fps, mdl.preprocessing, inference.view_kinds(), tuple(sorted(loaded))
    )
    stop = _StopFlag()
    executor_info = runner.open()  # before the signal handlers: a cluster client may install its own
    out = plan.out
    try:
        with disk_full_is_store_error(out):  # ENOSPC/EDQUOT anywhere below: DiskFull, exit 3
            store = _open_for_writing(out)
            _forget_listings(store)
            with store.lock(run_id), stop.installed():
                warnings += store.lock_notes  # a lock broken on the way in is reported
                try:
                    summary = _drive(
                        _Run(
                            stage,
                            runner,
                            executor_info,
                            found,
                            store,
                            inference,
                            mdl,
                            enc,
                            reason,
                            head_info,
                            params,
                            warnings,
                            started,
                            t0,
                            stop,
                            emit,
                        )
                    )
                except Exception as exc:
                    if no_space(exc) is not None:
                        _end_interrupted(store, run_id, str(disk_full(out, exc)))
                    raise
    finally:
        runner.close()
    killpoint("run-ended")
    emit(
        {
            "event": "done",
            "run_id": run_id,
            "seconds": round(summary.seconds, 3),
            "interrupted": summary.interrupted,
            **{s: summary.count(s) for s in RESULT_STATUSES},
            "out_of_distribution": summary.out_of_distribution,
        }
    )
    return summary


def _drive(r: _Run) -> RunSummary:
    """The run with the store's lock held: run record, triage, the executor, index, run end."""
    stage, store, emit = r.stage, r.store, r.emit
    plan, run_id, refs, skipped_files = stage.plan, stage.run_id, r.refs, r.skipped_files
    paths = [p if is_url(p) else Path(p) for p in plan.archives]
    store.begin_run(
        run_id,
        {
            "started": r.started,
            "config": {
                "paths": archive_labels(paths),
                "heads": list(stage.heads),
                "backend": plan.backend,
                "precision": plan.precision,
                "batch_size": plan.batch_size,
                "workers": plan.workers,
                "overwrite": plan.overwrite,
                "queries": list(plan.queries),
                "params": r.params,
                "record_paths": plan.record_paths,
                "executor": r.runner.name,
                "max_series_bytes": plan.max_series_bytes,
            },
            "model": {
                "name": r.mdl.card.get("name"),
                "path": str(r.mdl.folder),
                "fingerprint": r.mdl.fingerprint,
                "distribution": {
                    k: v
                    for k, v in (r.mdl.card.get("distribution") or {}).items()
                    if k in ("threshold", "statistics_sha256")
                }
                or None,
            },
            "heads": {
                h["name"]: {
                    "version": h["version"],
                    "plugin": h["plugin"],
                    "weights_sha256": h["weights_sha256"],
                    "code_sha256": h["code_sha256"],
                    "budget_seconds": r.inference.budgets.get(h["name"]),
                }
                for h in r.head_info
            },
            "backend": {"name": r.enc.name, "reason": r.reason, **r.enc.describe()},
            "executor": r.executor_info,
            "fingerprint": stage.fingerprint,
            "host": {
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "mrfm": __version__,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            },
        },
    )
    killpoint("after-discovery")
    summary = RunSummary(
        run_id,
        plan.out,
        r.enc.name,
        r.reason,
        warnings=[*r.warnings, *r.found.warnings],
        skipped_files=skipped_files,
        executor=dict(r.executor_info),
    )
    for w in summary.warnings:
        emit({"event": "warning", "message": w})
    listed = None if isinstance(refs, SeriesStream) else refs  # a stream's counts are unknown until the query ends
    emit(
        {
            "event": "scan",
            "series": None if listed is None else len(listed),
            "studies": None if listed is None else len({ref.study_uid for ref in listed}),
            "skipped_files": skipped_files,
            "backend": r.enc.name,
            "backend_reason": r.reason,
            "run_id": run_id,
        }
    )
    sessions = open_export_sessions(store, plan.out, list(plan.exports), plan.export_dir, plan.export_to)
    remote: set[str] = set()
    try:
        done = _reporter(refs, summary, emit, sessions)
        work = _triage(refs, store, stage, done, local_where() | {"executor": r.runner.name})
        driver = Driver(store, r.inference, summary, done, emit, r.stop)
        remote = r.runner.execute(stage, work, driver) if work else set()
        if isinstance(refs, SeriesStream):
            summary.query_incomplete = refs.stopped_early
            for w in refs.late_warnings():
                summary.warnings.append(w)
                emit({"event": "warning", "message": w})
    finally:
        r.inference.close()
        for session in sessions:
            close_export(session, summary.warnings, emit)
    summary.interrupted = bool(r.stop)
    if summary.interrupted:
        summary.warnings.append(
            f"interrupted by signal {r.stop.signal}: the series in flight were finished; rerun to resume"
        )
    n_index = _update_index(store, remote)
    summary.seconds = time.perf_counter() - r.t0
    store.finish_run(
        run_id,
        {
            "finished": now(),
            # load is summed over loader processes; wait_for_load is what inference spent waiting for it
            "timings": {"seconds": round(summary.seconds, 3), **{k: round(v, 3) for k, v in summary.stages.items()}},
            "counts": {s: summary.count(s) for s in RESULT_STATUSES}
            | {"files_skipped": skipped_files, "out_of_distribution": summary.out_of_distribution},
            "warnings": summary.warnings,
            "index_rows": n_index,
            "workers": summary.workers,
            "executor": summary.executor,
        },
        status="interrupted" if summary.interrupted else "finished",
    )
    return summary


def _end_interrupted(store: ResultStore, run_id: str, why: str) -> None:
    """Best effort, after a full disk: the run record says ``interrupted`` where that small write
    still fits (else a later reader finds the run abandoned); a record the run could not finish
    beginning is removed."""
    try:
        store.free_reserve()
        record = store.recorded_runs().get(run_id)
        if record is not None and record.get("status") != "running":
            store.discard_run(run_id)
        elif record is not None:
            store.finish_run(run_id, {"finished": now(), "reason": why}, status="interrupted")
    except Exception:
        pass


def _update_index(store: ResultStore, remote: set[str]) -> int:
    """Index rows of the series written now; rows written by other processes (Ray workers) are
    read from their groups, the rest of the index is kept (rebuilt only when damaged)."""
    if remote:
        _forget_listings(store)
        store.note_series(sorted(remote))
    return store.update_index()


def _forget_listings(store: ResultStore) -> None:
    """An object-store client (s3fs) caches folder listings for the life of the process, so it
    misses groups other processes wrote since: Ray workers, or runs of other processes."""
    fs = getattr(store.root.store, "fs", None)
    if fs is not None and hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()


def _not_mr(ref: SeriesRef) -> bool:
    return bool(ref.reader == "dicom" and ref.modality and ref.modality != "MR")


def _reporter(
    refs: list[SeriesRef] | SeriesStream, summary: RunSummary, emit: Callable[[Event], None], sessions: list[Any]
) -> Callable[[SeriesResult], None]:
    """What happens when a series is finished, whoever wrote it: export, summary, event."""
    lock = threading.Lock()
    by_key = (
        refs.by_key if isinstance(refs, SeriesStream) else {ref.key: ref for ref in refs}
    )  # a stream fills it as it goes

    def done(result: SeriesResult) -> None:
        if sessions and result.status in DONE_STATUSES:
            export_series(sessions, result.key, by_key.get(result.key), summary.warnings, emit)
        with lock:
            summary.results.append(result)
        emit(
            {
                "event": "series",
                "key": result.key,
                "study": result.study_uid,
                "status": result.status,
                "reason": result.reason,
                "seconds": round(result.seconds, 3),
                "out_of_distribution": result.out_of_distribution,
            }
        )

    return done


def _triage(
    refs: Any, store: ResultStore, stage: StagePlan, done: Callable[[SeriesResult], None], where: dict[str, Any]
) -> Any:
    """The work of :func:`_triage_page` over all series; over a PACS query's stream, lazily, page by
    page as the query answers, so the first series is fetched before the query ends."""
    if isinstance(refs, SeriesStream):
        # the writer thread writes while later pages are triaged here: the group they share exists first
        store.root.require_group("series")
        return (w for page in refs.pages() for w in _triage_page(page, store, stage, done, where))
    return _triage_page(refs, store, stage, done, where)


def _triage_page(
    refs: list[SeriesRef],
    store: ResultStore,
    stage: StagePlan,
    done: Callable[[SeriesResult], None],
    where: dict[str, Any],
) -> list[Work]:
    """Resume: the series still to do, with the heads each needs. Non-MR series are recorded
    skipped here; series every selected head is done on are reported resumed (or still failed)."""
    work: list[Work] = []
    overwrite, head_fps = stage.plan.overwrite, stage.head_fps
    mr = [ref for ref in refs if not _not_mr(ref)]
    # answered from the index where it can; deep: every chunk's checksum is verified (~20 ms for
    # a 256x256x180 mask), so a damaged chunk found by nothing else is redone by the next run
    todo = {} if overwrite else store.triage([ref.key for ref in mr], head_fps, verify="deep")
    todo = todo if overwrite else changed_at_source(mr, store, todo, head_fps)
    for ref in refs:
        if _not_mr(ref):
            why = f"modality {ref.modality} is not MR; mrfm runs MR series only"
            attrs = safe_attrs(ref, stage.run_id, stage.fingerprint, None, stage.plan.record_paths, where)[0]
            done(write_item(store, WriteItem(ref.key, attrs, [], "skipped", why, result_for(ref, "skipped", why))))
            killpoint("between-series")
            continue
        pending = set(head_fps) if overwrite else todo[ref.key]
        if pending:
            work.append(Work(ref, pending))
            continue
        stored = store.series_attrs(ref.key) or {}
        if stored.get("status") == "failed":
            # the heads selected now are done, but a head outside this run's selection failed:
            # the series is still failed, and the run says so
            failed = sorted(h for h, r in (stored.get("heads") or {}).items() if r.get("error") and h not in head_fps)
            scope = f" (head(s) {', '.join(failed)} not selected in this run)" if failed else ""
            done(result_for(ref, "failed", f"still failed{scope}: {stored.get('reason')}"))
        else:
            done(result_for(ref, "resumed", "every head done with a matching fingerprint"))
    return work


def _open_for_writing(out: str | Path) -> ResultStore:
    """Open or create the store; a path that cannot hold one is a usage error, a store that
    exists but cannot be read is a store error. A URL (s3://, gs://, ...) is opened as given."""
    if is_remote(out):
        return _open_store(str(out), out)
    path = local_path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot create the store ({exc.strerror or exc})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: not writable")
    return _open_store(path, out)


def _open_store(path: str | Path, out: str | Path) -> ResultStore:
    try:
        return ResultStore(path, mode="a")
    except MrfmError:
        raise
    except Exception as exc:
        raise StoreError(f"{out}: cannot open the result store ({type(exc).__name__}: {exc})") from exc
