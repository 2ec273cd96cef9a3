"""Typed errors, one small hierarchy for the whole engine.

A series-level error (:class:`InputError`, :class:`GeometryError`, :class:`HeadError`) fails that
series with its reason and never the run. Run-level errors end the run before it writes anything
it cannot finish; the CLI maps each type to an exit code and shows no traceback for any of them
(``--debug`` does)::

    MrfmError                 base of every expected error
      UsageError              bad options, unknown head/backend, nothing to run       exit 2
      InputError              a file or series cannot be read                         (series fails)
        LoadError             a reader could not turn a series into a volume          (series fails)
        ViewError             the volume could not be resampled into the views        (series fails)
        GeometryError         its geometry is not a valid 3D grid                     (series fails)
          StackError          the frames of a DICOM series do not stack               (series fails)
      BackendUnavailable      the requested backend cannot run here                   exit 2
      HeadError               a head failed or broke its declaration                  (series fails)
        HeadOutputError       an output does not match the head's manifest            (series fails)
        HeadBudgetExceeded    a head's predict call ran past its time budget          (series fails)
      StoreError              the result store is unusable                            exit 3
        StoreLocked           another run holds the store                             exit 3
        NodeUnreadable        one node's metadata cannot be read                      exit 3
        DiskFull              no space (or quota) left where the store is written     exit 3
      HeaderError             a DICOM header lacks what an image needs                (file skipped)
      SourceError             a PACS cannot be reached, refused or failed a request   exit 2
      SkipSeries              an exporter has nothing to export for a series          (series skipped)

An interrupted run is not an exception: it finishes the series in flight and returns its summary
with ``interrupted`` set, whose exit code is ``EXIT_INTERRUPTED``. :func:`one_line` turns any
exception into the one-line reason recorded on a series, a skipped file or a plugin.
"""

from __future__ import annotations

EXIT_OK, EXIT_SERIES_FAILED, EXIT_USAGE, EXIT_STORE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class MrfmError(Exception):
    """Base of every error mrfm expects and explains; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_SERIES_FAILED


class UsageError(MrfmError, ValueError):
    """The request cannot run as given: a bad option, an unknown name, no input found."""

    exit_code = EXIT_USAGE


class InputError(MrfmError):
    """A file or series cannot be turned into a volume; the message names the file and the rule."""


class GeometryError(InputError):
    """A series' geometry is not a usable 3D grid (non-finite or singular affine, bad orientation
    vectors, zero or negative spacing, slices that do not stack)."""


class BackendUnavailable(MrfmError):
    """The requested encoder backend cannot run on this machine (missing library or device)."""

    exit_code = EXIT_USAGE


class HeadError(MrfmError):
    """A head failed on a batch, or returned something its manifest does not declare."""


class StoreError(MrfmError):
    """The result store cannot be opened, written or trusted; the message names the node."""

    exit_code = EXIT_STORE


class StoreLocked(StoreError):
    """Another run holds the store's lock; the message names its host, pid and run."""


class DiskFull(StoreError):
    """ENOSPC or EDQUOT while writing a store or an export; the message names the folder. What
    was written stays consistent (the series in flight reads ``incomplete``); a rerun after
    freeing space resumes."""


class OverBudget(InputError):
    """A series (or a file) needs more memory to decode than the budget allows
    (:mod:`engine.memory_budget`)."""


class SourceError(MrfmError):
    """A PACS source cannot be reached, refused the association or failed a query; during a
    run, a series whose fetch fails is that series' failure (the run goes on)."""

    exit_code = EXIT_USAGE


class LoadError(InputError):
    """A series (or one of its files) cannot be turned into a volume; the message says which
    file and why."""


class HeaderError(MrfmError, ValueError):
    """A DICOM header lacks what an image needs (Rows/Columns) or declares what cannot be (more
    mosaic tiles than pixels). Not an InputError: the readers name the file around it, as they do
    for any unreadable header (a ValueError), so the recorded reason reads as it always has."""


class ViewError(InputError):
    """The series could not be resampled into the encoder's views."""


class StackError(GeometryError, ValueError):
    """The frames of a series do not form one regular 3D grid."""


class HeadOutputError(HeadError, ValueError):
    """A head returned something its manifest does not declare."""

    def __init__(self, head: str, output: str, reason: str):
        super().__init__(f"head {head!r} output {output!r}: {reason}")
        self.head, self.output, self.reason = head, output, reason


class HeadBudgetExceeded(HeadError):
    """A head's predict call ran past its time budget."""


class NodeUnreadable(StoreError):
    """A store node's metadata cannot be read; the message is 'path: why'."""


class SkipSeries(MrfmError):
    """Raised by an exporter when a series has nothing it can export (e.g. a NIfTI source for DICOM SEG)."""


class HeadRunError(AssertionError):
    """``engine.testing``: the head could not be run or failed on the volume; the message says why.
    An AssertionError, so pytest reports it as a failed check of the head under test."""


class GroupsError(ValueError):
    """``engine.dicom.groups``: the bytes are not what the fast functional-group walker reads; the
    caller reads the file with pydicom instead (never reaches a user)."""


def one_line(
    exc: BaseException, *, named: bool = False, limit: int = 300, fold: bool = False, message: str | None = None
) -> str:
    """The one-line reason for ``exc``: the first line of its message (``fold``: the whole message
    with its white space folded), at most ``limit`` characters; ``named`` puts the type's name in
    front. An empty message gives the type's name alone. ``message`` replaces ``str(exc)`` when
    the caller has cleaned it (as views do with ITK's)."""
    raw = str(exc) if message is None else message
    text = " ".join(raw.split()) if fold else (raw.strip().splitlines() or [""])[0]
    text = text[:limit]
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if named else text


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SERIES_FAILED",
    "EXIT_STORE",
    "EXIT_USAGE",
    "BackendUnavailable",
    "DiskFull",
    "GeometryError",
    "GroupsError",
    "HeadBudgetExceeded",
    "HeadError",
    "HeadOutputError",
    "HeadRunError",
    "HeaderError",
    "InputError",
    "LoadError",
    "MrfmError",
    "NodeUnreadable",
    "OverBudget",
    "SkipSeries",
    "SourceError",
    "StackError",
    "StoreError",
    "StoreLocked",
    "UsageError",
    "ViewError",
    "one_line",
]
