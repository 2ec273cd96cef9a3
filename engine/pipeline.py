"""The streaming pipeline behind ``mrfm run``.

discover -> (worker processes) load + views -> (this process, owns the accelerator) encode +
heads + map back -> (writer thread) Zarr store. Bounded queues between the stages keep memory
flat and let decoding, inference and writing overlap.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import platform
import queue
import secrets
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SERIES_FAILED, MrfmError, StoreError, UsageError
from .faults import killpoint
from .features import TextFeatures
from .fingerprint import head_fingerprints, head_record, run_fingerprint
from .geometry import axis_codes, orientation_name, spacing
from .inference import Inference, SeriesOutputs, load_heads
from .prepare import Prepared, init_worker, prepare
from .store import ResultStore, now

Event = dict[str, Any]


@dataclass
class SeriesResult:
    key: str
    study_uid: str
    description: str
    status: str  # complete | failed | skipped | resumed
    reason: str | None = None
    seconds: float = 0.0


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
    stages: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "wait_for_load": 0.0, "infer": 0.0, "write": 0.0})

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def exit_code(self) -> int:
        """130 when interrupted, 1 when any series failed, else 0 (documented in the README)."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SERIES_FAILED if self.count("failed") else EXIT_OK


def _source_record(ref: Any, record_paths: bool) -> dict[str, Any]:
    """How a series' files are identified in the store: by label (archive name and index) and
    content digest, never by a path below the archive root unless ``record_paths`` is set."""
    sources = list(ref.sources)
    first = sources[0] if sources else None
    rec: dict[str, Any] = {"count": len(sources), "first": str(first) if first is not None else None}
    digest = getattr(first, "digest", None)
    if digest:
        rec["digest"] = digest
    if record_paths and first is not None:
        rec["paths"] = [getattr(s, "path_text", None) or _path_text(s) for s in sources]
    return rec


def _path_text(source: Any) -> str:
    member = getattr(source, "member", None)
    return f"{source.path}!{member}" if member else str(getattr(source, "path", source))


# load notes that could carry a path or free text from the archive are not recorded
_PRIVATE_NOTES = {"problems", "source", "path", "paths", "file", "files"}


def _series_attrs(ref: Any, run_id: str, fingerprint: str, prep: Prepared | None, record_paths: bool = False) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "series_key": ref.key,
        "study_uid": ref.study_uid,
        "series_uid": ref.series_uid,
        "modality": ref.modality,
        "description": ref.description or "",
        "reader": ref.reader,
        "source": _source_record(ref, record_paths),
        "problems": list(ref.problems),
        "run_id": run_id,
        "fingerprint": fingerprint,
    }
    if prep is not None and prep.affine is not None:
        attrs["geometry"] = {
            "shape": list(prep.shape),
            "affine": prep.affine.tolist(),
            "spacing": list(spacing(prep.affine)),
            "orientation": orientation_name(prep.affine),
            "axcodes": axis_codes(prep.affine),
            "frame": "RAS+ mm; affine maps voxel (i, j, k, 1) to world",
        }
        attrs["load_notes"] = {k: v for k, v in prep.meta.items() if isinstance(v, (str, int, float, bool, list)) and k not in _PRIVATE_NOTES}
        attrs["problems"] = list(dict.fromkeys([*ref.problems, *prep.meta.get("problems", [])]))
    return attrs


def _safe_attrs(ref: Any, run_id: str, fingerprint: str, prep: Prepared | None, record_paths: bool) -> tuple[dict[str, Any], str | None]:
    """Series attributes, or (attributes without geometry, reason) when the geometry cannot be
    described: one series' odd affine fails that series, never the run."""
    try:
        return _series_attrs(ref, run_id, fingerprint, prep, record_paths), None
    except Exception as exc:
        where = ref.sources[0] if getattr(ref, "sources", None) else ref.key
        reason = f"{where}: cannot describe the series geometry ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        return _series_attrs(ref, run_id, fingerprint, None, record_paths), reason


def default_workers() -> int:
    """Loader processes before anything is measured: none on machines with two cores or fewer,
    where the process that runs the encoder needs every core (examples/benchmark_pipeline.py
    measured 0.8x with one worker on two cores); otherwise every core but the inference one."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else cores - 1


def workers_for(load_seconds: float, infer_seconds: float, cores: int | None = None) -> int:
    """Loaders needed so loading keeps up with inference, from the measured per-series times:
    ceil(load / infer), within the cores the inference process leaves free. A GPU that encodes
    in milliseconds gets every spare core; a CPU-bound encoder gets few."""
    cores = cores or os.cpu_count() or 1
    if cores <= 2:
        return 0
    need = math.ceil(load_seconds / max(infer_seconds, 1e-3))
    return max(1, min(cores - 1, need))


def _iter_prepared(refs: list[Any], preprocessing: dict[str, Any], kinds: tuple[str, ...], workers: int) -> Iterator[tuple[Any, Prepared]]:
    """Prepared series in input order, with at most ~2 per worker in flight.

    A loader process that dies (a decoder crash) costs only the series that killed it: the
    series in flight are retried one per fresh process, and loading goes on.
    """
    if workers <= 0:
        for ref in refs:
            yield ref, prepare(ref, preprocessing, kinds)
        return
    ctx = mp.get_context("spawn")  # fork after torch initialised its threads is unsafe

    def new_pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=init_worker)

    pool = new_pool(workers)
    it = iter(refs)
    pending: deque[tuple[Any, Future]] = deque()

    def top_up() -> None:
        while len(pending) < 2 * workers:
            nxt = next(it, None)
            if nxt is None:
                return
            pending.append((nxt, pool.submit(prepare, nxt, preprocessing, kinds)))

    try:
        top_up()
        while pending:
            ref, fut = pending.popleft()
            try:
                prep = fut.result()
            except BrokenProcessPool:
                in_flight = [ref, *(r for r, _ in pending)]
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                for r in in_flight:
                    yield r, _prepare_alone(new_pool, r, preprocessing, kinds)
                pool = new_pool(workers)
                top_up()
                continue
            top_up()
            yield ref, prep
    finally:
        # a stopped run waits only for the loads already running, not for the queued ones
        pool.shutdown(wait=True, cancel_futures=True)


def _prepare_alone(new_pool: Callable[[int], ProcessPoolExecutor], ref: Any, preprocessing: dict[str, Any], kinds: tuple[str, ...]) -> Prepared:
    """Load one series in a process of its own; its death fails this series only."""
    pool = new_pool(1)
    try:
        return pool.submit(prepare, ref, preprocessing, kinds).result()
    except BrokenProcessPool:
        where = ref.sources[0] if getattr(ref, "sources", None) else ref.key
        return Prepared(ref.key, error=f"{where}: the loader process died while loading this series (a decoder crash)")
    finally:
        pool.shutdown(wait=True)


def _prepared_stream(todo: list[Any], preprocessing: dict[str, Any], kinds: tuple[str, ...], workers: int | None,
                     batch_size: int, summary: RunSummary) -> Iterator[tuple[Any, Prepared]]:
    """Prepared series; with ``workers=None`` the first batch is loaded in-process to measure
    load and inference time per series, and the rest by as many loaders as keep up."""
    if workers is not None or len(todo) <= batch_size or (os.cpu_count() or 1) <= 2:
        summary.workers = workers if workers is not None else default_workers()
        yield from _iter_prepared(todo, preprocessing, kinds, summary.workers)
        return
    probe, rest = todo[:batch_size], todo[batch_size:]
    yield from _iter_prepared(probe, preprocessing, kinds, 0)
    # the consumer has run inference on the probe batch before asking for more
    n = len(probe)
    summary.workers = workers_for(summary.stages["load"] / n, summary.stages["infer"] / n)
    yield from _iter_prepared(rest, preprocessing, kinds, summary.workers)


class _Writer(threading.Thread):
    """The single writer of the store: consumes finished series from a bounded queue."""

    def __init__(self, store: ResultStore, on_done: Callable[[SeriesResult], None], maxsize: int = 8):
        super().__init__(name="mrfm-writer", daemon=True)
        self.store, self.on_done = store, on_done
        self.seconds = 0.0
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            key, attrs, outputs, status, reason, result, replace = item
            t = time.perf_counter()
            try:
                self.store.write_series(key, attrs, outputs, status, reason, replace=replace)
            except Exception as exc:  # a write failure is that series' failure, not the run's
                # the store marks the group failed with this reason where it still can
                result.status, result.reason = "failed", str(exc) if isinstance(exc, StoreError) else f"could not write series group: {exc}"
            self.seconds += time.perf_counter() - t
            self.on_done(result)
            killpoint("between-series")

    def put(self, key: str, attrs: dict[str, Any], outputs: list, status: str, reason: str | None,
            result: SeriesResult, replace: bool = False) -> None:
        if not self.is_alive():
            raise RuntimeError("writer thread stopped") from self.error
        self.queue.put((key, attrs, outputs, status, reason, result, replace))

    def close(self) -> None:
        self.queue.put(None)
        self.join()


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


def _prepare_run(model: Any, backend: str, precision: str, batch_size: int, heads: list[str] | None,
                 params: dict[str, dict[str, Any]], queries: list[str]) -> tuple[Any, Any, str, dict[str, Any], TextFeatures | None, list[str]]:
    """Model, backend, text and heads: everything a usage mistake can break, before any I/O."""
    from .backends import select
    from .model import load_model

    try:
        mdl = load_model(model)
    except MrfmError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {model}: not a usable model folder ({exc})") from exc
    enc, reason = select(backend, mdl, precision=precision, max_batch=batch_size)
    device = getattr(enc, "device", torch.device("cpu"))
    warnings: list[str] = []
    text: TextFeatures | None = None
    if queries:
        # text queries are encoded once per run and shared by every head that reads them
        tower = mdl.text_tower()
        if tower is None:
            warnings.append("--query given but the model has no text tower; text-reading heads get no queries")
        else:
            with torch.inference_mode():
                text = TextFeatures(queries, tower.encode(queries))
    loaded, head_warnings = load_heads(heads, mdl, device, params, text)
    warnings.extend(head_warnings)
    if not loaded:
        raise UsageError("no head can run: " + "; ".join(warnings or ["none selected"]))
    return mdl, enc, reason, loaded, text, warnings


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
    on_event: Callable[[Event], None] | None = None,
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
    """
    from .discover import scan

    emit = on_event or (lambda e: None)
    paths = [Path(p) for p in paths]
    started, t0 = now(), time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
    params = {k: dict(v) for k, v in (params or {}).items()}
    queries = list(queries or [])

    mdl, enc, reason, loaded, text, warnings = _prepare_run(model, backend, precision, batch_size, heads, params, queries)
    # each head's fingerprint covers its manifest, weights, parameters and code
    head_info = [head_record(n, type(h)) | {"manifest": h.spec} for n, h in loaded.items()]
    fingerprint = run_fingerprint(mdl.fingerprint, head_info, mdl.preprocessing, params)
    head_fps = head_fingerprints(mdl.fingerprint, head_info, mdl.preprocessing, params)
    inference = Inference(enc, loaded, text, batch_size, budgets=budgets, default_budget=default_budget, on_event=emit)

    found = scan(paths, **({"record_paths": True} if record_paths else {}))
    refs = list(found.series)
    skipped_files = len(getattr(found, "skipped", []) or [])
    if not refs:
        detail = f"; {skipped_files} file(s) skipped: " + "; ".join(found.warnings[:5]) if found.warnings else ""
        raise UsageError(f"no DICOM or NIfTI series found under {', '.join(map(str, paths))}{detail}")

    _check_exporters(exports or [])
    store = _open_for_writing(out)
    stop = _StopFlag()
    with store.lock(run_id), stop.installed():
        store.begin_run(run_id, {
            "started": started,
            "config": {"paths": [str(p) for p in paths], "heads": sorted(loaded), "backend": backend, "precision": precision,
                       "batch_size": batch_size, "workers": workers, "overwrite": overwrite, "queries": queries, "params": params,
                       "record_paths": record_paths},
            "model": {"name": mdl.card.get("name"), "path": str(mdl.folder), "fingerprint": mdl.fingerprint},
            "heads": {h["name"]: {"version": h["version"], "plugin": h["plugin"], "weights_sha256": h["weights_sha256"],
                                  "code_sha256": h["code_sha256"], "budget_seconds": inference.budgets.get(h["name"])} for h in head_info},
            "backend": {"name": enc.name, "reason": reason, **enc.describe()},
            "fingerprint": fingerprint,
            "host": {"hostname": socket.gethostname(), "pid": os.getpid(), "platform": platform.platform(), "python": platform.python_version(),
                     "torch": torch.__version__, "mrfm": __version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        })
        killpoint("after-discovery")
        summary = RunSummary(run_id, str(out), enc.name, reason, warnings=[*warnings, *found.warnings], skipped_files=skipped_files)
        for w in summary.warnings:
            emit({"event": "warning", "message": w})
        emit({"event": "scan", "series": len(refs), "studies": len({r.study_uid for r in refs}), "skipped_files": skipped_files,
              "backend": enc.name, "backend_reason": reason, "run_id": run_id})
        sessions = _export_sessions(store, out, exports or [], export_dir)
        try:
            _stream(refs, store, inference, mdl, summary, emit, stop, run_id=run_id, fingerprint=fingerprint, head_fps=head_fps,
                    overwrite=overwrite, batch_size=batch_size, workers=workers, record_paths=record_paths, sessions=sessions)
        finally:
            inference.close()
            for session in sessions:
                _close_export(session, summary, emit)
        summary.interrupted = bool(stop)
        if summary.interrupted:
            summary.warnings.append(f"interrupted by signal {stop.signal}: the series in flight were finished; rerun to resume")
        n_index = store.update_index()  # rows of the series written now; rebuilt only when damaged
        summary.seconds = time.perf_counter() - t0
        store.finish_run(run_id, {
            "finished": now(),
            # load is summed over worker processes; wait_for_load is what inference spent waiting for it
            "timings": {"seconds": round(summary.seconds, 3), **{k: round(v, 3) for k, v in summary.stages.items()}},
            "counts": {s: summary.count(s) for s in ("complete", "failed", "skipped", "resumed")} | {"files_skipped": skipped_files},
            "warnings": summary.warnings,
            "index_rows": n_index,
            "workers": summary.workers,
        }, status="interrupted" if summary.interrupted else "finished")
    emit({"event": "done", "run_id": run_id, "seconds": round(summary.seconds, 3), "interrupted": summary.interrupted,
          **{s: summary.count(s) for s in ("complete", "failed", "skipped", "resumed")}})
    return summary


def _check_exporters(names: list[str]) -> None:
    if not names:
        return
    from .plugins import get_exporters

    known = get_exporters()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown export format(s) {', '.join(unknown)}; installed: {', '.join(sorted(known)) or 'none'}")


def _export_sessions(store: ResultStore, out: str | Path, names: list[str], export_dir: str | Path | None) -> list[Any]:
    from .export import ExportSession

    base = Path(out)
    return [ExportSession(store, name, Path(export_dir) / name if export_dir else base.with_name(f"{base.name}-{name}"))
            for name in names]


def _export_one(sessions: list[Any], key: str, ref: Any, summary: RunSummary, emit: Callable[[Event], None]) -> None:
    """Export a series just written (or found complete); a failure is reported, not fatal."""
    for session in sessions:
        try:
            res = session.series(key, source=ref)
        except Exception as exc:  # an exporter bug must not cost the run
            res = type("R", (), {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"})()
        if res.status == "failed":
            msg = f"export {session.exporter.name} of {key} failed: {res.reason}"
            summary.warnings.append(msg)
            emit({"event": "warning", "message": msg})


def _close_export(session: Any, summary: RunSummary, emit: Callable[[Event], None]) -> None:
    try:
        session.close()
    except Exception as exc:
        msg = f"export {session.exporter.name}: could not finish ({type(exc).__name__}: {exc})"
        summary.warnings.append(msg)
        emit({"event": "warning", "message": msg})


def _open_for_writing(out: str | Path) -> ResultStore:
    """Open or create the store; a path that cannot hold one is a usage error, a store that
    exists but cannot be read is a store error."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot create the store ({exc.strerror or exc})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: not writable")
    try:
        return ResultStore(path, mode="a")
    except MrfmError:
        raise
    except Exception as exc:
        raise StoreError(f"{out}: cannot open the result store ({type(exc).__name__}: {exc})") from exc


def _stream(refs: list[Any], store: ResultStore, inference: Inference, mdl: Any, summary: RunSummary,
            emit: Callable[[Event], None], stop: _StopFlag, *, run_id: str, fingerprint: str, head_fps: dict[str, str],
            overwrite: bool, batch_size: int, workers: int | None, record_paths: bool, sessions: list[Any] | None = None) -> None:
    """Triage for resume, then load -> infer -> write every series still to do."""
    lock = threading.Lock()
    by_key = {ref.key: ref for ref in refs}

    def done(result: SeriesResult) -> None:
        if sessions and result.status in ("complete", "resumed"):
            _export_one(sessions, result.key, by_key.get(result.key), summary, emit)
        with lock:
            summary.results.append(result)
        emit({"event": "series", "key": result.key, "study": result.study_uid, "status": result.status,
              "reason": result.reason, "seconds": round(result.seconds, 3)})

    def result(ref: Any, status: str, why: str | None, seconds: float = 0.0) -> SeriesResult:
        return SeriesResult(ref.key, ref.study_uid, ref.description or "", status, why, seconds)

    writer = _Writer(store, done)
    writer.start()
    todo = []
    pending: dict[str, set[str]] = {}
    for ref in refs:
        if ref.reader == "dicom" and ref.modality and ref.modality != "MR":
            why = f"modality {ref.modality} is not MR; mrfm runs MR series only"
            writer.put(ref.key, _safe_attrs(ref, run_id, fingerprint, None, record_paths)[0], [], "skipped", why, result(ref, "skipped", why))
            continue
        # deep: every chunk's checksum is verified (~20 ms for a 256x256x180 mask), so a damaged
        # chunk found by nothing else is redone by the next run
        pending[ref.key] = set(head_fps) if overwrite else store.pending_heads(ref.key, head_fps, deep=True)
        if pending[ref.key]:
            todo.append(ref)
            continue
        stored = store.series_attrs(ref.key) or {}
        if stored.get("status") == "failed":
            # the heads selected now are done, but a head outside this run's selection failed:
            # the series is still failed, and the run says so
            failed = sorted(h for h, r in (stored.get("heads") or {}).items() if r.get("error") and h not in head_fps)
            scope = f" (head(s) {', '.join(failed)} not selected in this run)" if failed else ""
            done(result(ref, "failed", f"still failed{scope}: {stored.get('reason')}"))
        else:
            done(result(ref, "resumed", "every head done with a matching fingerprint"))

    batch: list[tuple[Any, Prepared, dict[str, Any]]] = []

    def flush() -> None:
        if batch:
            summary.stages["infer"] += _infer_and_write(inference, batch, writer, store, run_id, head_fps, None if overwrite else pending)
            batch.clear()

    try:
        with torch.inference_mode():
            t_wait = time.perf_counter()
            for ref, prep in _prepared_stream(todo, mdl.preprocessing, inference.view_kinds(), workers, batch_size, summary):
                summary.stages["wait_for_load"] += time.perf_counter() - t_wait
                summary.stages["load"] += prep.seconds
                killpoint("series-loaded")
                attrs, why = _safe_attrs(ref, run_id, fingerprint, prep, record_paths)
                why = prep.error or why
                if why:
                    writer.put(ref.key, attrs, [], "failed", why, result(ref, "failed", why, prep.seconds))
                else:
                    batch.append((ref, prep, attrs))
                    if len(batch) >= batch_size:
                        flush()
                if stop:
                    break  # the series already loaded are finished below; the rest wait for resume
                t_wait = time.perf_counter()
            flush()
    finally:
        writer.close()
    summary.stages["write"] = writer.seconds


def _infer_and_write(inference: Inference, batch: list[tuple[Any, Prepared, dict[str, Any]]], writer: _Writer, store: ResultStore,
                     run_id: str, head_fps: dict[str, str], pending: dict[str, set[str]] | None) -> float:
    """Run the heads each series still needs and queue it for writing; returns inference seconds.

    ``pending`` (None with --overwrite) holds the heads resume found missing per series; a
    series whose grid changed since it was stored runs every head and replaces the group.
    """
    only: list[set[str] | None] = []
    for ref, _, attrs in batch:
        stored = store.series_attrs(ref.key) if pending is not None else None
        same_grid = stored is not None and stored.get("geometry") == attrs.get("geometry")
        only.append(pending.get(ref.key) if pending is not None and same_grid else None)
    t = time.perf_counter()
    results = _run_isolated(inference, [p for _, p, _ in batch], only)
    seconds = time.perf_counter() - t
    per = seconds / len(batch)
    for (ref, prep, attrs), res, ran in zip(batch, results, only):
        if isinstance(res, str):  # the encoder itself failed on this series
            writer.put(ref.key, attrs, [], "failed", res,
                       SeriesResult(ref.key, ref.study_uid, ref.description or "", "failed", res, prep.seconds + per))
            continue
        written_heads = {o.head for o in res.outputs}
        attrs["heads"] = {
            name: {"version": h.spec["version"], "outputs": [d["name"] for d in h.spec["outputs"]] if name in written_heads else [],
                   "error": res.errors.get(name), "fingerprint": head_fps[name], "run_id": run_id}
            for name, h in inference.heads.items() if ran is None or name in ran
        }
        status = "failed" if res.errors else "complete"
        reason = "; ".join(res.errors.values()) if res.errors else None
        writer.put(ref.key, attrs, res.outputs, status, reason,
                   SeriesResult(ref.key, ref.study_uid, ref.description or "", status, reason, prep.seconds + per), ran is None)
    return seconds


def _run_isolated(inference: Inference, preps: list[Prepared], only: list[set[str] | None]) -> list[SeriesOutputs | str]:
    """Inference over a batch; when the encoder fails on the batch, each series is retried alone
    so only the one that breaks it fails (with the reason as a string in its place)."""
    try:
        return list(inference.run(preps, only))
    except Exception as exc:
        if len(preps) == 1:
            return [f"{preps[0].key}: the encoder failed on this series ({type(exc).__name__}: {_first_line(exc)})"]
    return [r for p, o in zip(preps, only) for r in _run_isolated(inference, [p], [o])]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""
