"""SIGTERM ends every command as documented, never with the shell's 143.

While ``mrfm run`` writes series, the run's own handler (:class:`engine.pipeline._StopFlag`)
finishes the series in flight and marks the run ``interrupted`` (exit 130). Around it, this
handler covers the rest of the command: before the run has begun (model, heads, scan, lock)
SIGTERM acts like Ctrl-C (exit 130, nothing written); once the run has ended (its record is
written) the outcome is decided and the signal changes nothing (0 when every series is done).
Other commands stop as on Ctrl-C (130).
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class TermAsInterrupt:
    """``with TermAsInterrupt() as term:`` for one command; ``term.begun()`` once a run has begun."""

    def __init__(self) -> None:
        self.run_begun = False
        self.late_signal: int | None = None
        self._old: Any = None

    def __enter__(self) -> "TermAsInterrupt":
        self.run_begun, self.late_signal = False, None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def begun(self) -> None:
        """The run has begun: from here its own handler, then its result, decide the exit code."""
        self.run_begun = True

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.run_begun:
            raise KeyboardInterrupt  # the CLI reports "interrupted" and exits 130
        self.late_signal = signum  # after the run's end: its record and exit code stand


TERM = TermAsInterrupt()
