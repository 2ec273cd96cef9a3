"""mrfm's engine: the public API for users and plugin authors.

Plugin authors import only what is exported here (``import engine`` / ``@engine.hookimpl``).
"""

from __future__ import annotations

from . import errors
from .backends.base import Backend
from .errors import (
    BackendUnavailable, GeometryError, HeadError, InputError, MrfmError, SourceError, StoreError, StoreLocked, UsageError,
)
from .features import Features, HeadInput, TextFeatures, View, ViewInfo
from .geometry import Volume
from .heads import Head, HeadContext, HeadOutputError, NetHead
from .hookspecs import hookimpl
from .discover import ScanResult, SeriesRef, sanitise_key
from .sources import (
    PACS_READER, PacsReader, RemoteRef, Source, SourceOptions, http_session, instances_digest, is_url, public_url,
)

__version__ = "0.1.0"



def run(*args, **kwargs):
    """Run the model and heads over archives into a store: see :func:`engine.pipeline.run`."""
    from .pipeline import run as _run

    return _run(*args, **kwargs)


def scan(*args, **kwargs):
    """Find studies and series from headers only: see :func:`engine.discover.scan`."""
    from .discover import scan as _scan

    return _scan(*args, **kwargs)


def open_store(*args, **kwargs):
    """Open a result store: see :func:`engine.store.open_store`."""
    from .store import open_store as _open

    return _open(*args, **kwargs)


__all__ = [
    "BackendUnavailable",
    "GeometryError",
    "HeadError",
    "InputError",
    "MrfmError",
    "SourceError",
    "StoreError",
    "StoreLocked",
    "UsageError",
    "errors",
    "Backend",
    "Features",
    "Head",
    "HeadContext",
    "HeadInput",
    "HeadOutputError",
    "NetHead",
    "TextFeatures",
    "View",
    "ViewInfo",
    "Volume",
    "hookimpl",
    "PACS_READER",
    "PacsReader",
    "RemoteRef",
    "ScanResult",
    "SeriesRef",
    "Source",
    "SourceOptions",
    "http_session",
    "instances_digest",
    "is_url",
    "public_url",
    "sanitise_key",
    "open_store",
    "run",
    "scan",
    "__version__",
]
