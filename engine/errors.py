"""Typed errors, one small hierarchy for the whole engine.

A series-level error (:class:`InputError`, :class:`GeometryError`, :class:`HeadError`) fails that
series with its reason and never the run. Run-level errors end the run before it writes anything
it cannot finish; the CLI maps each type to an exit code and shows no traceback for any of them
(``--debug`` does)::

    MrfmError                 base of every expected error
      UsageError              bad options, unknown head/backend, nothing to run       exit 2
      InputError              a file or series cannot be read                         (series fails)
        GeometryError         its geometry is not a valid 3D grid                     (series fails)
      BackendUnavailable      the requested backend cannot run here                   exit 2
      HeadError               a head failed or broke its declaration                  (series fails)
      StoreError              the result store is unusable                            exit 3
        StoreLocked           another run holds the store                             exit 3
      SourceError             a PACS cannot be reached, refused or failed a request   exit 2
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


class SourceError(MrfmError):
    """A PACS source cannot be reached, refused the association or failed a query; during a
    run, a series whose fetch fails is that series' failure (the run goes on)."""

    exit_code = EXIT_USAGE


class Interrupted(MrfmError):
    """The run was stopped by SIGINT/SIGTERM after finishing the series in flight."""

    exit_code = EXIT_INTERRUPTED


__all__ = [
    "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SERIES_FAILED", "EXIT_STORE", "EXIT_USAGE",
    "BackendUnavailable", "GeometryError", "HeadError", "InputError", "Interrupted", "MrfmError",
    "SourceError", "StoreError", "StoreLocked", "UsageError",
]
