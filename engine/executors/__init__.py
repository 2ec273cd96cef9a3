"""Executors: where a run's stages execute.

The driver (:func:`engine.pipeline.run`) sets up the model and heads, scans, triages for resume,
holds the store's lock and writes the run record and the index. An executor takes the series
still to do through load + views -> encode + heads + map back -> write, and hands each series'
result back to the driver as it is written:

- ``local``: loader processes, this process owning the accelerator, a writer thread;
- ``ray``: Ray Data on a Ray cluster: loading as CPU tasks, an actor pool for inference that
  writes its series groups into the store itself.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..errors import UsageError
from .stages import SeriesResult

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Setup:
    """How to rebuild the run's model, backend and heads in another process."""

    model: str | None
    backend: str
    precision: str
    batch_size: int
    heads: list[str]
    params: dict[str, dict[str, Any]]
    queries: list[str]
    budgets: dict[str, float] | None = None
    default_budget: float | None = None
    force: bool = False


@dataclass(frozen=True)
class RunPlan:
    """What every stage of one run needs; picklable, so it can travel to workers."""

    run_id: str
    out: str
    fingerprint: str
    head_fps: dict[str, str]
    preprocessing: dict[str, Any]
    kinds: tuple[str, ...]
    batch_size: int
    workers: int | None
    overwrite: bool
    record_paths: bool
    setup: Setup
    max_series_bytes: int | None = None  # the per-series memory budget; each SeriesRef carries it to its loader


@dataclass
class Work:
    """One series still to do; ``pending`` holds the heads resume found missing (all with --overwrite)."""

    ref: Any
    pending: set[str] = field(default_factory=set)


@dataclass
class Driver:
    """The driver's side of a run, which stays in the driver's process."""

    store: Any
    inference: Any  # the driver's Inference; executors that run inference elsewhere build their own
    summary: Any  # RunSummary: stages and workers are filled in by the executor
    done: Callable[[SeriesResult], None]
    emit: Callable[[dict[str, Any]], None]
    stop: Any  # truthy once SIGINT/SIGTERM asked the run to stop


class Executor(Protocol):
    name: str

    def open(self) -> dict[str, Any]:
        """Start or connect to what runs the stages; returns its description for the run record."""

    def execute(self, plan: RunPlan, work: list[Work], driver: Driver) -> set[str]:
        """Load, infer and write every series of ``work``, calling ``driver.done`` for each as
        it is written; stop early (series in flight finished or left for resume) once
        ``driver.stop``. Returns the keys written by processes other than the driver's."""

    def close(self) -> None:
        """Release what :meth:`open` started."""


def local_where() -> dict[str, Any]:
    """Provenance of a series processed by the run's own process."""
    return {"executor": "local", "node": socket.gethostname(), "actor": "driver"}


def get_executor(name: str, *, ray_address: str | None = None, ray_actors: int | None = None) -> Executor:
    """The executor called ``name``; a UsageError names what is missing."""
    if name == "local":
        from .local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from .ray import RayExecutor

        return RayExecutor(address=ray_address, actors=ray_actors)
    raise UsageError(f"--executor {name}: unknown; choose one of {', '.join(EXECUTORS)}")
