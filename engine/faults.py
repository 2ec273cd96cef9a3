"""Deterministic fault injection for crash-safety tests.

``MRFM_KILL_AT=<point>`` makes the process kill itself with SIGKILL when it reaches that named
point (optionally ``<point>:<n>`` for the n-th time, counted from 1), so tests can prove that a
store survives a crash at each point and that the next run repairs it. Unset, this costs one
dictionary lookup per point.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def killpoint(name: str) -> None:
    """Die here, as ``kill -9`` would, when ``MRFM_KILL_AT`` names this point."""
    want = os.environ.get("MRFM_KILL_AT")
    if not want:
        return
    point, _, nth = want.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
