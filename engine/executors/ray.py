"""The Ray executor: the run's stages on a Ray cluster, through Ray Data.

    series to do -> dataset of SeriesRefs, one block per series (up to MAX_BLOCKS)
      -> map: load + views (CPU tasks; a decoder crash is retried, then fails that series only)
      -> map_batches: an actor pool, one actor per accelerator (or per two CPUs where there is
         none), each loading the model, backend and heads once; it encodes, runs the heads, maps
         back and writes each series group into the store itself, status last
      -> rows back to the driver: key, status, reason, node, actor

Ray Data's streaming executor bounds what is in flight, so memory stays flat whatever the
archive's size. The driver holds the store's lock and writes the run record and the index; the
actors only write distinct series groups. A worker that dies is restarted and its task retried;
series whose task kept killing its worker are retried one series at a time, and a series that
still kills it fails alone with its reason.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import time
import warnings
from typing import Any

import numpy as np
import torch

from ..distribution import distribution_for
from ..errors import DiskFull, MrfmError, UsageError
from ..faults import killpoint
from ..inference import Inference
from ..prepare import init_worker, prepare
from ..store import ResultStore
from .contract import Driver, StagePlan, Work
from .stages import (
    ReadySeries,
    SeriesResult,
    WriteItem,
    fingerprints,
    infer_batch,
    prepare_run,
    result_for,
    safe_attrs,
    write_item,
)

LOAD_RETRIES = 2  # a loader that dies this many more times fails its series
TASK_RETRIES = 3  # an inference batch is retried this often on a restarted actor
MAX_BLOCKS = 4096  # one series per block up to this many, so a crashing decoder costs few series
OOD_CODES: dict[bool | None, int] = {
    True: 1,
    False: 0,
}  # the out-of-distribution flag in an int8 column (-1: not scored)
INSTALL = "the ray executor needs Ray: pip install 'mrfm[ray]' (or pip install 'ray[data]')"


def _ray() -> Any:
    try:
        import ray  # Ray is an optional dependency
        import ray.data  # noqa: F401  (Ray without its data extra cannot run the pipeline)
    except ImportError as exc:
        raise UsageError(f"--executor ray: {INSTALL} ({exc})") from None
    return ray


def forwarded_env() -> dict[str, str]:
    """mrfm's own settings (disabled plugins, cache folder, fault points) travel to the workers."""
    return {k: v for k, v in os.environ.items() if k.startswith("MRFM_")}


# ---- worker side -------------------------------------------------------------------------------
_loader_ready = False


def _load(row: dict[str, Any], preprocessing: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, Any]:
    """Load one series and make its views; errors travel in the Prepared, never as exceptions."""
    global _loader_ready

    if not _loader_ready:
        init_worker()
        _loader_ready = True
    prep = prepare(pickle.loads(row["ref"]), preprocessing, tuple(kinds))
    return {**row, "prep": pickle.dumps(prep, protocol=5)}


class InferenceActor:
    """One per accelerator (or CPU slot): the model, backend and heads, loaded once."""

    def __init__(self, stage: StagePlan):
        import ray  # Ray is an optional dependency

        plan = stage.plan
        self.stage = stage
        params = {k: dict(v) for k, v in plan.params.items()}
        mdl, enc, _, loaded, text, _ = prepare_run(
            plan.model,
            plan.backend,
            plan.precision,
            plan.batch_size,
            list(stage.heads),
            params,
            list(plan.queries),
            plan.force,
        )
        _, fingerprint, _ = fingerprints(mdl, loaded, params)
        ctx = ray.get_runtime_context()
        self.where = {"executor": "ray", "node": socket.gethostname(), "actor": ctx.get_actor_id()}
        self.node_id, self.backend = ctx.get_node_id(), enc.name
        # a node with other model or head code would write results the fingerprints misdescribe
        self.mismatch = (
            None
            if fingerprint == stage.fingerprint
            else (
                f"node {self.where['node']} runs a model or heads other than the driver's (fingerprint {fingerprint[:19]}…, "
                f"driver {stage.fingerprint[:19]}…); install the same mrfm, heads and weights on every node"
            )
        )
        self.inference = Inference(
            enc,
            loaded,
            text,
            plan.batch_size,
            budgets=dict(plan.budgets or {}) or None,
            default_budget=plan.default_budget,
            distribution=distribution_for(mdl)[0],
        )
        self.store = ResultStore(plan.out, mode="a")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stage, plan = self.stage, self.stage.plan
        items: list[WriteItem] = []
        todo = []
        load = infer = 0.0
        for ref_b, pending_b, prep_b in zip(batch["ref"], batch["pending"], batch["prep"]):
            ref, pending, prep = pickle.loads(ref_b), pickle.loads(pending_b), pickle.loads(prep_b)
            load += prep.seconds
            attrs, why = safe_attrs(ref, stage.run_id, stage.fingerprint, prep, plan.record_paths, self.where)
            why = prep.error or why or self.mismatch
            if why:
                items.append(WriteItem(ref.key, attrs, [], "failed", why, result_for(ref, "failed", why, prep.seconds)))
            else:
                todo.append(ReadySeries(ref, prep, attrs, pending))
        if todo:
            with torch.inference_mode():
                done, infer = infer_batch(
                    self.inference, todo, self.store, stage.run_id, stage.head_fps, resume=not plan.overwrite
                )
            items.extend(done)
        rows: list[tuple[SeriesResult, float]] = []
        full: list[str] = []  # per row: why its write found the disk full, else ""
        for item in items:
            t = time.perf_counter()
            try:
                result = write_item(self.store, item)
            except DiskFull as exc:  # sent back as a row, not an errored block, which Ray would skip
                rows.append((item.result, time.perf_counter() - t))
                full.append(str(exc))
                break
            rows.append((result, time.perf_counter() - t))
            full.append("")
            killpoint("between-series")
        return {
            "disk_full": np.array(full),
            "key": np.array([r.key for r, _ in rows]),
            "study_uid": np.array([r.study_uid for r, _ in rows]),
            "description": np.array([r.description for r, _ in rows]),
            "status": np.array([r.status for r, _ in rows]),
            "reason": np.array([r.reason or "" for r, _ in rows]),
            "out_of_distribution": np.array([OOD_CODES.get(r.out_of_distribution, -1) for r, _ in rows], dtype=np.int8),
            "seconds": np.array([r.seconds for r, _ in rows], dtype=np.float64),
            "write": np.array([w for _, w in rows], dtype=np.float64),
            "load": np.full(len(rows), load / max(len(rows), 1)),
            "infer": np.full(len(rows), infer / max(len(rows), 1)),
            "node": np.array([self.where["node"]] * len(rows)),
            "node_id": np.array([self.node_id] * len(rows)),
            "actor": np.array([self.where["actor"]] * len(rows)),
            "backend": np.array([self.backend] * len(rows)),
            "pid": np.full(len(rows), os.getpid()),
        }


# ---- driver side -------------------------------------------------------------------------------
class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, actors: int | None = None):
        self.ray = _ray()
        self.address, self.actors = address, actors
        self._started = False

    def open(self) -> dict[str, Any]:
        ray = self.ray
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
                else:  # a Ray instance of this machine, for this run
                    ray.init(
                        num_cpus=os.cpu_count() or 1,
                        include_dashboard=False,
                        logging_level="WARNING",
                        log_to_driver=False,
                    )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UsageError(f"--ray-address {self.address}: cannot connect to a Ray cluster ({exc})") from exc
            self._started = True
        resources = ray.cluster_resources()
        self.cpus, self.gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
        self.n_actors = self.actors or (int(self.gpus) if self.gpus >= 1 else max(1, int(self.cpus) // 2))
        # loaders keep at least one CPU; actors share what is left when asked for more than fit
        self.loader_cpus = 1.0 if self.cpus >= 2 else 0.5
        self.actor_cpus = min(1.0, max(0.1, (self.cpus - self.loader_cpus) / self.n_actors))
        self.actor_gpus = min(1.0, self.gpus / self.n_actors) if self.gpus else 0.0
        return {
            "name": self.name,
            "address": self.address or "local",
            "ray": ray.__version__,
            "cluster": {"CPU": self.cpus, "GPU": self.gpus, "nodes": sum(1 for n in ray.nodes() if n.get("Alive"))},
            "actors": self.n_actors,
            "actor_resources": {"CPU": self.actor_cpus, "GPU": self.actor_gpus},
        }

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False

    def execute(self, stage: StagePlan, work: list[Work], driver: Driver) -> set[str]:
        written: set[str] = set()
        ran_on: dict[str, dict[str, Any]] = {}
        plan = stage.plan
        todo, batch_size, lost, isolated = list(work), plan.batch_size, [], False
        while todo and not driver.stop:
            lost = self._pass(stage, todo, batch_size, driver, written, ran_on)
            if not lost or isolated:
                break
            # a block or batch that kept killing its worker: once more, one series at a time
            todo, batch_size, isolated = lost, 1, True
        if not driver.stop:  # a stopped run leaves the rest to resume
            for w in lost:  # never silently lost: failed with the reason, redone by the next run
                why = (
                    f"the Ray worker processing this series died on every try ({LOAD_RETRIES + 1} loads, "
                    f"{TASK_RETRIES + 1} inference attempts): a decoder or encoder crash"
                )
                attrs = safe_attrs(
                    w.ref,
                    stage.run_id,
                    stage.fingerprint,
                    None,
                    plan.record_paths,
                    {"executor": self.name, "node": socket.gethostname(), "actor": "driver"},
                )[0]
                driver.done(
                    write_item(
                        driver.store, WriteItem(w.ref.key, attrs, [], "failed", why, result_for(w.ref, "failed", why))
                    )
                )
        driver.summary.workers = plan.workers or 0
        driver.summary.executor["ran_on"] = sorted(ran_on.values(), key=lambda r: (r["node"], r["actor"], r["pid"]))
        return written

    def _pass(
        self,
        stage: StagePlan,
        work: list[Work],
        batch_size: int,
        driver: Driver,
        written: set[str],
        ran_on: dict[str, dict[str, Any]],
    ) -> list[Work]:
        """One pass of the dataset over ``work``; returns the series no worker reported back."""
        from ray.data import DataContext  # Ray is an optional dependency

        ctx = DataContext.get_current()
        saved = ctx.max_errored_blocks, ctx.enable_progress_bars
        # a block is one series (or one batch): a block lost after its retries is reported below
        ctx.max_errored_blocks, ctx.enable_progress_bars = -1, False
        seen: set[str] = set()
        stages = driver.summary.stages
        try:
            for row in self._dataset(stage, work, batch_size).iter_rows():
                key = str(row["key"])
                seen.add(key)
                written.add(key)
                for name in ("load", "infer", "write"):
                    stages[name] += float(row[name])
                # one entry per actor process: a restarted actor keeps its id and gets a new pid
                actor = ran_on.setdefault(
                    f"{row['actor']}/{row['pid']}",
                    {
                        "node": str(row["node"]),
                        "node_id": str(row["node_id"]),
                        "actor": str(row["actor"]),
                        "pid": int(row["pid"]),
                        "backend": str(row["backend"]),
                        "series": 0,
                    },
                )
                actor["series"] += 1
                if str(row.get("disk_full") or ""):  # a full disk stops the run as the local executor's does: exit 3
                    why = str(row["disk_full"])
                    raise DiskFull(why) from OSError(errno.ENOSPC, why)  # the driver marks the run interrupted
                driver.done(
                    SeriesResult(
                        key,
                        str(row["study_uid"]),
                        str(row["description"]),
                        str(row["status"]),
                        str(row["reason"]) or None,
                        float(row["seconds"]),
                        {1: True, 0: False}.get(int(row.get("out_of_distribution", -1))),
                    )
                )
                if driver.stop:
                    break  # groups written so far are complete; the ones in flight are redone by resume
        except MrfmError:
            raise
        except Exception as exc:  # e.g. no actor could set up the run on its node
            raise UsageError(
                f"the Ray cluster could not run the pipeline: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:500]}"
            ) from exc
        finally:
            ctx.max_errored_blocks, ctx.enable_progress_bars = saved
        return [w for w in work if w.ref.key not in seen]

    def _dataset(self, stage: StagePlan, work: list[Work], batch_size: int) -> Any:
        """SeriesRefs -> load + views (tasks) -> inference and writing (actor pool)."""
        from ray.data import ActorPoolStrategy, TaskPoolStrategy  # Ray is an optional dependency

        env = forwarded_env()
        remote = {"runtime_env": {"env_vars": env}} if env else {}
        workers = stage.plan.workers
        loaders = {"compute": TaskPoolStrategy(size=workers)} if workers else {}
        rows = [
            {"key": w.ref.key, "ref": pickle.dumps(w.ref, protocol=5), "pending": pickle.dumps(w.pending, protocol=5)}
            for w in work
        ]
        ds = self.ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
        with warnings.catch_warnings():
            # retry limits can only be given as remote args, and Ray Data's defaults retry a crash forever
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map(
                _load,
                fn_kwargs={"preprocessing": stage.preprocessing, "kinds": list(stage.kinds)},
                num_cpus=self.loader_cpus,
                max_retries=LOAD_RETRIES,
                **loaders,
                **remote,
            )
            return ds.map_batches(
                InferenceActor,
                fn_constructor_kwargs={"stage": stage},
                batch_size=batch_size,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=self.n_actors),
                num_cpus=self.actor_cpus,
                num_gpus=self.actor_gpus or None,
                max_restarts=-1,
                max_task_retries=TASK_RETRIES,
                **remote,
            )
