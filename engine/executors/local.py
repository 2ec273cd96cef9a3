"""The local executor: loader processes -> this process (owns the accelerator: encode + heads +
map back) -> a writer thread. Bounded queues between the stages keep memory flat and let
decoding, inference and writing overlap."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

import torch

from ..faults import killpoint
from ..prepare import Prepared, init_worker, prepare
from ..series_ref import SeriesRef
from .contract import Driver, StagePlan, Work, local_where
from .stages import Loaded, ReadySeries, SeriesResult, WriteItem, infer_batch, result_for, safe_attrs, write_item


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


LOADER_THREADS = 2  # without loader processes: prepare() on this many threads


def _iter_prepared(
    refs: list[SeriesRef], preprocessing: dict[str, Any], kinds: tuple[str, ...], workers: int
) -> Iterator[Loaded]:
    """Prepared series in input order, with at most two per loader in flight.

    ``workers`` loader processes; with none (few cores), LOADER_THREADS threads, which still
    overlap loading with inference and with each other: decoding, resampling and the encoder
    release the GIL (two threads prepare about 1.6x as fast as one on two cores). A loader
    process that dies (a decoder crash) costs only the series that killed it: the series in
    flight are retried one per fresh process, and loading goes on.
    """
    if workers > 0:
        ctx = mp.get_context("spawn")  # fork after torch initialised its threads is unsafe
        n = workers

        def new_pool(k: int) -> Executor:
            return ProcessPoolExecutor(max_workers=k, mp_context=ctx, initializer=init_worker)
    else:
        n = max(1, min(LOADER_THREADS, os.cpu_count() or 1))

        def new_pool(k: int) -> Executor:
            return ThreadPoolExecutor(max_workers=k, thread_name_prefix="mrfm-loader")

    pool = new_pool(n)
    it = iter(refs)
    pending: deque[tuple[SeriesRef, Future]] = deque()

    def top_up() -> None:
        while len(pending) < 2 * n:
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
                    yield Loaded(r, _prepare_alone(new_pool, r, preprocessing, kinds))
                pool = new_pool(n)
                top_up()
                continue
            top_up()
            yield Loaded(ref, prep)
    finally:
        # a stopped run waits only for the loads already running, not for the queued ones
        pool.shutdown(wait=True, cancel_futures=True)


def _prepare_alone(
    new_pool: Callable[[int], Executor], ref: SeriesRef, preprocessing: dict[str, Any], kinds: tuple[str, ...]
) -> Prepared:
    """Load one series in a process of its own; its death fails this series only."""
    pool = new_pool(1)
    try:
        return pool.submit(prepare, ref, preprocessing, kinds).result()
    except BrokenProcessPool:
        where = ref.sources[0] if getattr(ref, "sources", None) else ref.key
        return Prepared(ref.key, error=f"{where}: the loader process died while loading this series (a decoder crash)")
    finally:
        pool.shutdown(wait=True)


def _prepared_stream(
    todo: list[SeriesRef],
    preprocessing: dict[str, Any],
    kinds: tuple[str, ...],
    workers: int | None,
    batch_size: int,
    summary: Any,
) -> Iterator[Loaded]:
    """Prepared series; with ``workers=None`` the first batch is loaded in-process to measure
    load and inference time per series, and the rest by as many loaders as keep up."""
    if workers is not None or not isinstance(todo, list) or len(todo) <= batch_size or (os.cpu_count() or 1) <= 2:
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

    def __init__(self, store: Any, on_done: Callable[[SeriesResult], None], maxsize: int = 8):
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
            if self.error is not None:
                continue  # after a store error (a full disk) nothing more is written: drain, stay unblocking
            t = time.perf_counter()
            try:
                result = write_item(self.store, item)
                self.seconds += time.perf_counter() - t
                self.on_done(result)
                killpoint("between-series")
            except BaseException as exc:  # write_item lets only run-ending errors through
                self.error = exc

    def put(self, item: WriteItem) -> None:
        if self.error is not None:
            raise self.error
        if not self.is_alive():
            raise RuntimeError("writer thread stopped")
        self.queue.put(item)

    def close(self) -> None:
        """Wait for the queued writes; raise the error that stopped the writer, if any."""
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class LocalExecutor:
    """Today's single-machine pipeline: adaptive loader pool, inference here, writer thread."""

    name = "local"

    def open(self) -> dict[str, Any]:
        return {"name": self.name, **local_where()}

    def close(self) -> None:
        pass

    def execute(self, stage: StagePlan, work: list[Work], driver: Driver) -> set[str]:
        summary, inference, store = driver.summary, driver.inference, driver.store
        pending: dict[str, set[str]] = {}

        def refs_of(items: Any) -> Iterator[Any]:  # work may be a PACS query's stream: taken as it arrives
            for w in items:
                pending[w.ref.key] = w.pending
                yield w.ref

        todo = list(refs_of(work)) if isinstance(work, list) else refs_of(work)
        where = local_where()
        writer = _Writer(store, driver.done)
        writer.start()
        plan = stage.plan
        batch: list[ReadySeries] = []

        def flush() -> None:
            if batch:
                items, seconds = infer_batch(
                    inference, batch, store, stage.run_id, stage.head_fps, resume=not plan.overwrite
                )
                summary.stages["infer"] += seconds
                for item in items:
                    writer.put(item)
                batch.clear()

        try:
            with torch.inference_mode():
                t_wait = time.perf_counter()
                for loaded in _prepared_stream(
                    todo, stage.preprocessing, stage.kinds, plan.workers, plan.batch_size, summary
                ):
                    ref, prep = loaded.ref, loaded.prep
                    summary.stages["wait_for_load"] += time.perf_counter() - t_wait
                    summary.stages["load"] += prep.seconds
                    killpoint("series-loaded")
                    attrs, why = safe_attrs(ref, stage.run_id, stage.fingerprint, prep, plan.record_paths, where)
                    why = prep.error or why
                    if why:
                        writer.put(
                            WriteItem(ref.key, attrs, [], "failed", why, result_for(ref, "failed", why, prep.seconds))
                        )
                    else:
                        batch.append(ReadySeries(ref, prep, attrs, pending[ref.key]))
                        if len(batch) >= plan.batch_size:
                            flush()
                    if driver.stop:
                        break  # the series already loaded are finished below; the rest wait for resume
                    t_wait = time.perf_counter()
                flush()
        finally:
            writer.close()
        summary.stages["write"] = writer.seconds
        return set()
