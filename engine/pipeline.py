"""The streaming pipeline behind ``mrfm run``.

discover -> (worker processes) load + views -> (this process, owns the accelerator) encode +
heads + map back -> (writer thread) Zarr store. Bounded queues between the stages keep memory
flat and let decoding, inference and writing overlap.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue
import secrets
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from . import __version__
from .features import TextFeatures
from .fingerprint import file_digest, head_fingerprints, run_fingerprint
from .geometry import axis_codes, orientation_name, spacing
from .inference import Inference, SeriesOutputs, load_heads
from .prepare import Prepared, init_worker, prepare
from .store import ResultStore, now

Event = dict[str, Any]
EXIT_OK, EXIT_SERIES_FAILED, EXIT_USAGE = 0, 1, 2


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
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "wait_for_load": 0.0, "infer": 0.0, "write": 0.0})

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 when no series failed, 1 when any did (documented in the README)."""
        return EXIT_SERIES_FAILED if self.count("failed") else EXIT_OK


def _series_attrs(ref: Any, run_id: str, fingerprint: str, prep: Prepared | None) -> dict[str, Any]:
    sources = [str(s) for s in ref.sources]
    attrs: dict[str, Any] = {
        "series_key": ref.key,
        "study_uid": ref.study_uid,
        "series_uid": ref.series_uid,
        "modality": ref.modality,
        "description": ref.description or "",
        "reader": ref.reader,
        "source": {"first": sources[0] if sources else None, "count": len(sources)},
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
        attrs["load_notes"] = {k: v for k, v in prep.meta.items() if isinstance(v, (str, int, float, bool, list)) and k not in ("problems",)}
        attrs["problems"] = list(dict.fromkeys([*ref.problems, *prep.meta.get("problems", [])]))
    return attrs


def default_workers() -> int:
    """Loader processes: cores - 1 (at most 4), but none on machines with two cores or fewer,
    where the process that runs the encoder needs every core (examples/benchmark_pipeline.py
    measured 0.8x with one worker on two cores)."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores - 1)


def _iter_prepared(refs: list[Any], preprocessing: dict[str, Any], kinds: tuple[str, ...], workers: int) -> Iterator[tuple[Any, Prepared]]:
    """Prepared series in input order, with at most ~2 per worker in flight."""
    if workers <= 0:
        for ref in refs:
            yield ref, prepare(ref, preprocessing, kinds)
        return
    ctx = mp.get_context("spawn")  # fork after torch initialised its threads is unsafe
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker) as pool:
        pending: deque[tuple[Any, Future]] = deque()
        it = iter(refs)
        for ref in it:
            pending.append((ref, pool.submit(prepare, ref, preprocessing, kinds)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            ref, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(prepare, nxt, preprocessing, kinds)))
            yield ref, fut.result()


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
                result.status, result.reason = "failed", f"could not write series group: {exc}"
            self.seconds += time.perf_counter() - t
            self.on_done(result)

    def put(self, key: str, attrs: dict[str, Any], outputs: list, status: str, reason: str | None,
            result: SeriesResult, replace: bool = False) -> None:
        if not self.is_alive():
            raise RuntimeError("writer thread stopped") from self.error
        self.queue.put((key, attrs, outputs, status, reason, result, replace))

    def close(self) -> None:
        self.queue.put(None)
        self.join()


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
    on_event: Callable[[Event], None] | None = None,
) -> RunSummary:
    """Run the model and heads over every series found under ``paths`` into the store ``out``.

    Resume is the default: a series is skipped when every selected head is done on it with a
    matching fingerprint (model, head, preprocessing, parameters); otherwise it is redone and
    outputs of other heads already in the store are kept. ``overwrite=True`` redoes everything.
    Bad input is recorded on its series and never ends the run.
    """
    from .backends import select
    from .discover import scan
    from .model import load_model

    emit = on_event or (lambda e: None)
    paths = [Path(p) for p in paths]
    started, t0 = now(), time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
    params = {k: dict(v) for k, v in (params or {}).items()}
    queries = list(queries or [])

    mdl = load_model(model)
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
        raise ValueError("no head can run: " + "; ".join(warnings or ["none selected"]))
    head_info = [
        {"name": n, "version": h.spec["version"], "plugin": type(h).__module__, "manifest": h.spec,
         "weights_sha256": file_digest(type(h).weights_path())}
        for n, h in loaded.items()
    ]
    fingerprint = run_fingerprint(mdl.fingerprint, head_info, mdl.preprocessing, params)
    head_fps = head_fingerprints(mdl.fingerprint, head_info, mdl.preprocessing, params)
    inference = Inference(enc, loaded, text, batch_size)

    store = ResultStore(out, mode="a")
    store.begin_run(run_id, {
        "started": started,
        "config": {"paths": [str(p) for p in paths], "heads": sorted(loaded), "backend": backend, "precision": precision,
                   "batch_size": batch_size, "workers": workers, "overwrite": overwrite, "queries": queries, "params": params},
        "model": {"name": mdl.card.get("name"), "path": str(mdl.folder), "fingerprint": mdl.fingerprint},
        "heads": {h["name"]: {"version": h["version"], "plugin": h["plugin"], "weights_sha256": h["weights_sha256"]} for h in head_info},
        "backend": {"name": enc.name, "reason": reason, **enc.describe()},
        "fingerprint": fingerprint,
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
                 "torch": torch.__version__, "mrfm": __version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    })
    summary = RunSummary(run_id, str(out), enc.name, reason, warnings=list(warnings))
    for w in warnings:
        emit({"event": "warning", "message": w})

    found = scan(paths)
    refs = list(found.series)
    if not refs:
        found.warnings.append(f"no DICOM or NIfTI series found under {', '.join(map(str, paths))}")
    summary.warnings.extend(found.warnings)
    for w in found.warnings:
        emit({"event": "warning", "message": w})
    emit({"event": "scan", "series": len(refs), "studies": len({r.study_uid for r in refs}), "backend": enc.name, "backend_reason": reason, "run_id": run_id})

    lock = threading.Lock()

    def done(result: SeriesResult) -> None:
        with lock:
            summary.results.append(result)
        emit({"event": "series", "key": result.key, "study": result.study_uid, "status": result.status,
              "reason": result.reason, "seconds": round(result.seconds, 3)})

    writer = _Writer(store, done)
    writer.start()
    todo = []
    pending: dict[str, set[str]] = {}
    for ref in refs:
        if ref.reader == "dicom" and ref.modality and ref.modality != "MR":
            reason_ = f"modality {ref.modality} is not MR; mrfm runs MR series only"
            writer.put(ref.key, _series_attrs(ref, run_id, fingerprint, None), [], "skipped", reason_,
                       SeriesResult(ref.key, ref.study_uid, ref.description or "", "skipped", reason_))
            continue
        pending[ref.key] = set(head_fps) if overwrite else store.pending_heads(ref.key, head_fps)
        if pending[ref.key]:
            todo.append(ref)
        else:
            done(SeriesResult(ref.key, ref.study_uid, ref.description or "", "resumed", "every head done with a matching fingerprint"))

    n_workers = workers if workers is not None else default_workers()
    batch: list[tuple[Any, Prepared]] = []
    try:
        with torch.inference_mode():
            t_wait = time.perf_counter()
            for ref, prep in _iter_prepared(todo, mdl.preprocessing, inference.view_kinds(), n_workers):
                summary.stages["wait_for_load"] += time.perf_counter() - t_wait
                summary.stages["load"] += prep.seconds
                if prep.error:
                    writer.put(ref.key, _series_attrs(ref, run_id, fingerprint, None), [], "failed", prep.error,
                               SeriesResult(ref.key, ref.study_uid, ref.description or "", "failed", prep.error, prep.seconds))
                    continue
                batch.append((ref, prep))
                if len(batch) >= batch_size:
                    summary.stages["infer"] += _infer_and_write(inference, batch, writer, store, run_id, fingerprint, head_fps, None if overwrite else pending)
                    batch = []
                t_wait = time.perf_counter()
            if batch:
                summary.stages["infer"] += _infer_and_write(inference, batch, writer, store, run_id, fingerprint, head_fps, None if overwrite else pending)
    finally:
        writer.close()
    summary.stages["write"] = writer.seconds

    n_index = store.rebuild_index()
    summary.seconds = time.perf_counter() - t0
    store.finish_run(run_id, {
        "finished": now(),
        # load is summed over worker processes; wait_for_load is what inference spent waiting for it
        "timings": {"seconds": round(summary.seconds, 3), **{k: round(v, 3) for k, v in summary.stages.items()}},
        "counts": {s: summary.count(s) for s in ("complete", "failed", "skipped", "resumed")},
        "warnings": summary.warnings,
        "index_rows": n_index,
    })
    emit({"event": "done", "run_id": run_id, "seconds": round(summary.seconds, 3),
          **{s: summary.count(s) for s in ("complete", "failed", "skipped", "resumed")}})
    return summary


def _infer_and_write(inference: Inference, batch: list[tuple[Any, Prepared]], writer: _Writer, store: ResultStore,
                     run_id: str, fingerprint: str, head_fps: dict[str, str], pending: dict[str, set[str]] | None) -> float:
    """Run the heads each series still needs and queue it for writing; returns inference seconds.

    ``pending`` (None with --overwrite) holds the heads resume found missing per series; a
    series whose grid changed since it was stored runs every head and replaces the group.
    """
    attrs_of = [_series_attrs(ref, run_id, fingerprint, prep) for ref, prep in batch]
    only: list[set[str] | None] = []
    for (ref, _), attrs in zip(batch, attrs_of):
        stored = store.series_attrs(ref.key) if pending is not None else None
        same_grid = stored is not None and stored.get("geometry") == attrs.get("geometry")
        only.append(pending.get(ref.key) if pending is not None and same_grid else None)
    t = time.perf_counter()
    results: list[SeriesOutputs] = inference.run([p for _, p in batch], only)
    seconds = time.perf_counter() - t
    per = seconds / len(batch)
    for (ref, prep), res, attrs, ran in zip(batch, results, attrs_of, only):
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
