"""Deterministic fault injection for crash-safety tests.

``MRFM_KILL_AT=<point>`` makes the process kill itself with SIGKILL when it reaches that named
point (``<point>:<n>`` for the n-th time, counted from 1), so tests can prove that a store
survives a crash at each point and that the next run repairs it. ``MRFM_PAUSE_AT=<point>:<s>``
sleeps ``s`` seconds there instead (to hold a lock while a second writer tries, or to deliver a
signal mid-run). ``MRFM_DISK_FULL_AT=<point>[:<n>]`` raises OSError(ENOSPC) there from the n-th
time on, as a full disk would (other points still write: a small write may fit where a large one
did not). Unset, a point costs a few environment lookups.

Points: ``start-up`` (heads loaded, before the scan), ``after-discovery``, ``series-loaded``,
``between-series`` (after a series is written), ``mid-series-write``, ``index-rebuild``,
``run-ended`` (the run record written, the lock released); also ``lock-write``, ``run-record``
(the run's first record), ``run-end`` (its last) and ``export-write`` (an export's files and
manifest), where a full disk is most telling.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

_counts: dict[str, int] = {}


def killpoint(name: str) -> None:
    """Die here, as ``kill -9`` would, or pause, when the environment names this point."""
    kill, pause, full = (
        os.environ.get("MRFM_KILL_AT"),
        os.environ.get("MRFM_PAUSE_AT"),
        os.environ.get("MRFM_DISK_FULL_AT"),
    )
    if not kill and not pause and not full:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if full:
        point, _, nth = full.partition(":")
        if point == name and _counts[name] >= int(nth or 1):
            raise OSError(errno.ENOSPC, f"No space left on device (MRFM_DISK_FULL_AT={full})")
    if kill:
        point, _, nth = kill.partition(":")
        if point == name and _counts[name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
    if pause:
        point, _, seconds = pause.partition(":")
        if point == name:
            sys.stderr.write(f"paused at {name}\n")  # a test waits for this line before it signals
            sys.stderr.flush()
            time.sleep(float(seconds or 1))
