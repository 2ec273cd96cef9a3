"""What the driver hands an executor, and what an executor promises back.

Kept apart from ``engine.executors`` (which picks an executor by name) so that the executors
import their contract without importing the package that imports them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..run_plan import RunPlan
from ..series_ref import SeriesRef
from .stages import SeriesResult


@dataclass(frozen=True)
class StagePlan:
    """The run's plan bound to what set-up fixed; picklable, so it can travel to workers, which
    rebuild the model, backend and heads from ``plan`` and ``heads``."""

    plan: RunPlan
    run_id: str
    fingerprint: str
    head_fps: dict[str, str]
    preprocessing: dict[str, Any]
    kinds: tuple[str, ...]
    heads: tuple[str, ...]  # the heads that loaded in the driver, in name order


@dataclass
class Work:
    """One series still to do; ``pending`` holds the heads resume found missing (all with --overwrite)."""

    ref: SeriesRef
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

    def execute(self, stage: StagePlan, work: list[Work], driver: Driver) -> set[str]:
        """Load, infer and write every series of ``work``, calling ``driver.done`` for each as
        it is written; stop early (series in flight finished or left for resume) once
        ``driver.stop``. Returns the keys written by processes other than the driver's."""

    def close(self) -> None:
        """Release what :meth:`open` started."""


def local_where() -> dict[str, Any]:
    """Provenance of a series processed by the run's own process."""
    return {"executor": "local", "node": socket.gethostname(), "actor": "driver"}
