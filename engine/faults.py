"""Deterministic fault injection for crash-safety tests.

``MRFM_KILL_AT=<point>`` makes the process kill itself with SIGKILL when it reaches that named
point (``<point>:<n>`` for the n-th time, counted from 1), so tests can prove that a store
survives a crash at each point and that the next run repairs it. ``MRFM_PAUSE_AT=<point>:<s>``
sleeps ``s`` seconds there instead (to hold a lock while a second writer tries, or to deliver a
signal mid-run). Unset, a point costs one environment lookup.

Points: ``after-discovery``, ``series-loaded``, ``between-series`` (after a series is written),
``mid-series-write``, ``index-rebuild``.
"""

from __future__ import annotations

import os
import signal
import time

_counts: dict[str, int] = {}


def killpoint(name: str) -> None:
    """Die here, as ``kill -9`` would, or pause, when the environment names this point."""
    kill, pause = os.environ.get("MRFM_KILL_AT"), os.environ.get("MRFM_PAUSE_AT")
    if not kill and not pause:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if kill:
        point, _, nth = kill.partition(":")
        if point == name and _counts[name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
    if pause:
        point, _, seconds = pause.partition(":")
        if point == name:
            time.sleep(float(seconds or 1))
