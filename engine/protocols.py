"""The shapes of the extension points a plugin fills, in one place (exported by ``engine``).

``Head`` and ``Backend`` are base classes (``engine.heads``, ``engine.backends.base``); the others
are protocols a plugin object satisfies by shape: a ``Reader`` (``register_readers``) turns files
into series and series into volumes, an ``Exporter`` (``register_exporters``) writes a store's
results where their consumers live, a ``Source`` yields series from somewhere other than a
folder or a zip file. ``EncoderOutputs`` is what an encoder architecture or backend returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

from .export import Exporter
from .model import EncoderOutputs

if TYPE_CHECKING:  # types named in signatures only
    from .discover import Source as SourceFile
    from .geometry import Volume
    from .series_ref import SeriesRef


@runtime_checkable
class Reader(Protocol):
    """What ``register_readers`` registers (the built-in DICOM and NIfTI readers are two).

    ``sniff`` sees a file's first 132 bytes; ``scan_file`` reads its header only and returns a
    record (raise to skip the file with that reason); ``group`` turns one reader's records into
    series; ``load`` returns a series' volume in RAS+ (raise ``engine.errors.LoadError`` naming
    the file and the rule for bad input). Every record and series must pickle: loading runs in
    worker processes.
    """

    name: str

    def sniff(self, source: SourceFile, head: bytes) -> bool: ...

    def scan_file(self, source: SourceFile, *, with_patient_age: bool = False) -> Any: ...

    def group(self, records: list[Any]) -> list[SeriesRef]: ...

    def load(self, ref: SeriesRef) -> Volume: ...


@runtime_checkable
class Source(Protocol):
    """Series from somewhere other than a local folder or zip file (a PACS, an object store).

    A source claims the URL ``schemes`` it serves, yields series references for an archive
    argument and a query (``where``: KEY=VALUE filters), and ``fetch`` makes a series' instances
    readable by the readers. Credentials come from the environment, never the URL or the store.
    """

    name: str
    schemes: tuple[str, ...]

    def find(self, url: str, where: dict[str, str]) -> Iterable[SeriesRef]: ...

    def fetch(self, ref: SeriesRef) -> SeriesRef: ...


__all__ = ["EncoderOutputs", "Exporter", "Reader", "Source"]
