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

from ..errors import UsageError
from ..run_plan import EXECUTORS, RunPlan
from .contract import Driver, Executor, StagePlan, Work, local_where
from .local import LocalExecutor
from .stages import SeriesResult

__all__ = [
    "EXECUTORS",
    "Driver",
    "Executor",
    "RunPlan",
    "SeriesResult",
    "StagePlan",
    "Work",
    "LocalExecutor",
    "get_executor",
    "local_where",
]


def get_executor(name: str, *, ray_address: str | None = None, ray_actors: int | None = None) -> Executor:
    """The executor called ``name``; a UsageError names what is missing."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from .ray import RayExecutor  # loaded only when chosen: it drives Ray, an optional dependency

        return RayExecutor(address=ray_address, actors=ray_actors)
    raise UsageError(f"--executor {name}: unknown; choose one of {', '.join(EXECUTORS)}")
