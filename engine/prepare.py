"""Worker-side stage: load a series and compute its views. Runs in worker processes, so it
returns plain picklable data and never raises for bad input (the error travels back instead)."""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .features import View
from .geometry import check_affine


@dataclass
class Prepared:
    """A loaded series reduced to what inference needs: native geometry and its views."""

    key: str
    shape: tuple[int, int, int] | None = None
    affine: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    views: dict[str, View] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def init_worker() -> None:
    """One thread per worker: parallelism comes from the processes. Ctrl-C reaches the whole
    process group; only the run's own process decides how to stop, so workers ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def prepare(ref: Any, preprocessing: dict[str, Any], kinds: tuple[str, ...]) -> Prepared:
    """Load ``ref`` and build the requested views; a failure becomes ``Prepared.error``.

    A Prepared that carries an affine always carries a finite, invertible one (the pipeline
    derives orientation and axis codes from it); every error names the file and the rule.
    """
    from .discover import load  # readers and ITK load in the worker, not where Prepared is imported
    from .views import ViewError, make_views  # (as above)

    start = time.perf_counter()
    where = str(ref.sources[0]) if getattr(ref, "sources", None) else str(ref.key)

    def failed(reason: str) -> Prepared:
        return Prepared(ref.key, error=reason, seconds=time.perf_counter() - start)

    try:
        volume = load(ref)
        check_affine(volume.affine, where)  # readers from plugins may skip the check
        if not np.isfinite(volume.data).all():
            raise InputError(f"{where}: pixel data contains non-finite values")
        views = make_views(volume, preprocessing, kinds)
        return Prepared(
            ref.key, volume.shape, volume.affine, dict(volume.meta), views, None, time.perf_counter() - start
        )
    except ViewError as exc:
        return failed(f"{where}: {exc}")
    except InputError as exc:  # reader errors already name the file
        return failed(str(exc))
    except Exception as exc:  # an unexpected reader bug must not end the run either
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines()[0][:300]
        return failed(f"{where}: could not load series: {tb}")
