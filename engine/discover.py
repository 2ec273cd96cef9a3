"""Discovery: find MRI series in folders and zip files with a cheap header scan.

``scan`` walks the inputs, asks each registered reader (``engine.plugins.get_readers()``) whether
it recognises a file, reads headers only, and lets each reader group its records into
:class:`SeriesRef` objects. ``load`` turns a :class:`SeriesRef` into a :class:`~engine.geometry.Volume`
through the reader that found it. Both are safe to call in worker processes: every type here
pickles.

A reader object provides::

    name: str
    sniff(source: Source, head: bytes) -> bool        # head = first 132 bytes
    scan_file(source: Source, *, with_patient_age: bool) -> record | None  # header only; raise if unreadable
    group(records: list) -> list[SeriesRef]
    load(ref: SeriesRef) -> Volume                     # raise LoadError on bad input
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .errors import InputError
from .geometry import Volume

HEAD_BYTES = 132  # DICOM preamble (128) + "DICM"


class LoadError(InputError):
    """A series (or one of its files) cannot be turned into a volume; the message says which
    file and why."""


@dataclass(frozen=True)
class Source:
    """One input file: a path on disk, or a member of a zip archive at ``path``."""

    path: Path
    member: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def read_bytes(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        return _open_zip(self.path, self.path.stat().st_mtime_ns).read(self.member)

    def read_head(self, n: int = HEAD_BYTES) -> bytes:
        """The first ``n`` bytes, without reading the whole file."""
        if self.member is None:
            with open(self.path, "rb") as fh:
                return fh.read(n)
        with _open_zip(self.path, self.path.stat().st_mtime_ns).open(self.member) as fh:
            return fh.read(n)

    def open(self) -> IO[bytes]:
        """A seekable binary file object (zip members are read into memory)."""
        if self.member is None:
            return open(self.path, "rb")
        return io.BytesIO(self.read_bytes())

    @property
    def name(self) -> str:
        return Path(self.member).name if self.member is not None else Path(self.path).name

    def __str__(self) -> str:
        return f"{self.path}!{self.member}" if self.member is not None else str(self.path)


@functools.lru_cache(maxsize=4)
def _open_zip(path: Path, mtime_ns: int) -> zipfile.ZipFile:
    """Keep a few archives open: reading members one by one must not re-parse the directory."""
    return zipfile.ZipFile(path)


@dataclass
class SeriesRef:
    """A series found by ``scan``: what it is, where its files are, and what looked wrong.

    ``dims`` is the shape of the volume ``load`` returns: (columns, rows, slices) for DICOM,
    i.e. (I, J, K) in the engine's convention, and the image shape for NIfTI.
    """

    key: str
    reader: str
    study_uid: str
    series_uid: str
    modality: str
    description: str
    sources: list[Source]
    dims: tuple[int, ...]
    n_slices: int
    orientation: str
    problems: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    series: list[SeriesRef]
    warnings: list[str]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitise_key(text: str) -> str:
    """Reduce a UID or file name to characters that are safe in store paths."""
    return _UNSAFE.sub("_", text).strip("_") or "series"


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in Path(name).parts)


def _is_zip(source: Source, head: bytes) -> bool:
    return source.member is None and head[:4] == b"PK\x03\x04" and zipfile.is_zipfile(source.path)


def iter_sources(paths: Iterable[str | Path], warnings: list[str]) -> Iterator[tuple[Source, bytes]]:
    """Every candidate file under ``paths`` with its first bytes; zip files are opened in place."""
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            warnings.append(f"{root}: no such file or folder")
            continue
        files = [root] if root.is_file() else _walk(root)
        for path in files:
            try:
                head = Source(path).read_head()
            except OSError as exc:
                warnings.append(f"{path}: unreadable ({exc.strerror or exc})")
                continue
            source = Source(path)
            if _is_zip(source, head):
                yield from _zip_members(path, warnings)
            else:
                yield source, head


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # a Zarr store (e.g. a result store written inside the archive) is never input
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d) and not (Path(dirpath) / d / "zarr.json").exists())
        for name in sorted(filenames):
            if not _hidden(name):
                yield Path(dirpath) / name


def _zip_members(path: Path, warnings: list[str]) -> Iterator[tuple[Source, bytes]]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and not _hidden(i.filename)]
            for info in sorted(infos, key=lambda i: i.filename):
                source = Source(path, info.filename)
                try:
                    with zf.open(info) as fh:
                        head = fh.read(HEAD_BYTES)
                except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
                    warnings.append(f"{source}: unreadable zip member ({exc})")
                    continue
                if head[:4] == b"PK\x03\x04":
                    warnings.append(f"{source}: nested zip archives are not scanned")
                    continue
                yield source, head
    except (OSError, zipfile.BadZipFile) as exc:
        warnings.append(f"{path}: unreadable zip archive ({exc})")


def _readers() -> dict[str, Any]:
    from .plugins import get_readers

    return {name: reg.obj for name, reg in sorted(get_readers().items())}


def scan(paths: Iterable[str | Path], *, with_patient_age: bool = False) -> ScanResult:
    """Find every DICOM/NIfTI series under ``paths`` (files, folders, zip archives).

    Never raises on bad input: unreadable or unrecognised files become ``warnings``, and
    series that will not load cleanly carry ``problems``. Patient age is recorded in
    ``meta`` only when ``with_patient_age`` is set.
    """
    readers = _readers()
    warnings: list[str] = []
    records: dict[str, list[Any]] = {name: [] for name in readers}
    for source, head in iter_sources(paths, warnings):
        if not head:
            warnings.append(f"{source}: empty file")
            continue
        reader = next((r for r in readers.values() if r.sniff(source, head)), None)
        if reader is None:
            warnings.append(f"{source}: not a DICOM or NIfTI file (skipped)")
            continue
        try:
            record = reader.scan_file(source, with_patient_age=with_patient_age)
        except Exception as exc:  # one bad file must not stop the scan
            warnings.append(f"{source}: skipped {reader.name} file ({_reason(exc)})")
            continue
        if record is not None:
            records[reader.name].append(record)
    series: list[SeriesRef] = []
    for name, reader in readers.items():
        if records[name]:
            series.extend(reader.group(records[name]))
    _dedupe_keys(series)
    return ScanResult(series=series, warnings=warnings)


def _dedupe_keys(series: list[SeriesRef]) -> None:
    seen: dict[str, int] = {}
    for ref in series:
        if ref.key in seen:
            seen[ref.key] += 1
            ref.key = f"{ref.key}-{seen[ref.key]}"
        else:
            seen[ref.key] = 0


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def load(ref: SeriesRef) -> Volume:
    """Load a series as a :class:`Volume` with the reader that found it.

    Raises :class:`LoadError` (naming the file and the reason) for every bad input.
    """
    readers = _readers()
    if ref.reader not in readers:
        raise LoadError(f"series {ref.key}: no reader named {ref.reader!r} is installed")
    try:
        return readers[ref.reader].load(ref)
    except LoadError:
        raise
    except Exception as exc:  # decoders raise many types; callers need one
        first = ref.sources[0] if ref.sources else ref.key
        raise LoadError(f"{first}: cannot load series {ref.key} ({_reason(exc)})") from exc
