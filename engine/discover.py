"""Discovery: find MRI series in folders and zip files with a cheap header scan.

``scan`` walks the inputs, asks each registered reader (``engine.plugins.get_readers()``) whether
it recognises a file, reads headers only, and lets each reader group its records into
:class:`SeriesRef` objects. ``load`` turns a :class:`SeriesRef` into a :class:`~engine.geometry.Volume`
through the reader that found it. Both are safe to call in worker processes: every type here
pickles.

Input accounting: every file ``scan`` looks at is either used by a series or listed in
``ScanResult.skipped`` with a reason, so ``files_seen == files_used + len(skipped)``.

No paths from below the archive root: each :class:`Source` carries a label, ``<root name>#<n>``
(``n`` = position in the sorted walk; zip members ``<zip label>#<m>``), and ``str(source)`` is that
label. Every warning and reason names files by label. ``scan(..., record_paths=True)`` makes the
labels full paths again; ``ScanResult.locations`` maps labels to paths for a listing the user asks for.

A reader object provides::

    name: str
    sniff(source: Source, head: bytes) -> bool        # head = first 132 bytes
    scan_file(source: Source, *, with_patient_age: bool) -> record | None  # header only; raise if unreadable
    group(records: list) -> list[SeriesRef]
    load(ref: SeriesRef) -> Volume                     # raise LoadError on bad input
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import os
import re
import stat
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from . import memory_budget
from .bounded_read import MAX_RATIO, RATIO_MIN_BYTES, ZIP_MEMBER_MAX_BYTES, ratio_problem
from .errors import InputError, LoadError, one_line  # noqa: F401 (LoadError: re-exported for readers)
from .geometry import Volume
from .series_ref import SeriesRef, sanitise_key  # noqa: F401 (re-exported: the old home of both)

HEAD_BYTES = 132  # DICOM preamble (128) + "DICM"
# The digest covers the first 16 KiB: enough for a DICOM header's SOP Instance UID or a NIfTI
# header and its first voxels, so it tells files apart without reading whole files twice.
DIGEST_BYTES = 16 * 1024
# the caps every compressed input shares live in bounded_read (zip members, Deflated DICOM, .gz)
ZIP_MAX_RATIO, ZIP_RATIO_MIN_BYTES = MAX_RATIO, RATIO_MIN_BYTES
_ZIP_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, ValueError)


@dataclass(frozen=True)
class Source:
    """One input file: a path on disk, or a member of a zip archive at ``path``.

    ``label`` is the PHI-safe name used in every message (``str(source)``); ``digest`` is a short
    content hash that finds the file again. Equality and hashing use ``path`` and ``member`` only.
    """

    path: Path
    member: str | None = None
    label: str = field(default="", compare=False)
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def read_bytes(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        return _open_zip(self.path, self.path.stat().st_mtime_ns, os.getpid()).read(self.member)

    def read_head(self, n: int = HEAD_BYTES) -> bytes:
        """The first ``n`` bytes, without reading the whole file."""
        with self.open() as fh:
            return fh.read(n)

    def open(self) -> IO[bytes]:
        """A seekable binary file object; a zip member is streamed, never read whole to seek."""
        if self.member is None:
            return open(self.path, "rb")
        zf = _open_zip(self.path, self.path.stat().st_mtime_ns, os.getpid())
        info = zf.getinfo(self.member)
        return _ZipMember(zf.open(info), info.file_size, str(self))  # type: ignore[arg-type,return-value]

    @property
    def name(self) -> str:
        return Path(self.member).name if self.member is not None else Path(self.path).name

    @property
    def path_text(self) -> str:
        """Where the file is (``zip!member`` for members); for listings the user asked for only."""
        return f"{self.path}!{self.member}" if self.member is not None else str(self.path)

    def __str__(self) -> str:
        return self.label or self.path_text

    def __repr__(self) -> str:
        return f"Source({str(self)!r})"


@functools.lru_cache(maxsize=4)
def _open_zip(path: Path, mtime_ns: int, pid: int) -> zipfile.ZipFile:
    """Keep a few archives open: reading members one by one must not re-parse the directory.

    Keyed by pid because a forked worker must not share the parent's file offset."""
    return zipfile.ZipFile(path)


class _ZipMember(io.RawIOBase):
    """A zip member opened for streaming. ``seek(0, 2)``/``tell()`` use the declared size, so
    measuring a member (as header readers do) never decompresses it; a read seeks the real
    stream only when the position moved."""

    def __init__(self, fh: zipfile.ZipExtFile, size: int, name: str) -> None:
        super().__init__()
        self._fh, self._size, self._pos, self.name = fh, size, 0, name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        if self._pos >= self._size:
            return b""
        if self._fh.tell() != self._pos:
            self._fh.seek(self._pos)
        data = self._fh.read(-1 if n is None or n < 0 else n)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        self._fh.close()
        super().close()


@dataclass(frozen=True)
class Skipped:
    """A file (or a folder not entered) that no series uses. ``source`` is its label; ``kind`` is
    one of :data:`SKIP_KINDS`."""

    source: str
    reason: str
    kind: str


SKIP_KINDS = {
    "unreadable": "the file, folder or zip member could not be read (permission, I/O or CRC error)",
    "special": "not a regular file (device, FIFO, socket)",
    "hidden": "a name starting with '.' or __MACOSX (operating-system clutter)",
    "zarr-store": "a Zarr store inside the archive (e.g. a result store) is never input",
    "symlink-outside": "a symlink whose target lies outside the archive root",
    "symlink-loop": "a symlinked folder that leads back to one of its own parents",
    "broken-symlink": "a symlink whose target does not exist",
    "already-seen": "the same file or folder was reached before (through a symlink or a zip name)",
    "corrupt-zip": "a zip archive whose directory cannot be read",
    "zip-traversal": "a zip member named with '..' or an absolute path",
    "encrypted": "an encrypted zip member",
    "too-large": f"a zip member declared larger than ZIP_MEMBER_MAX_BYTES ({ZIP_MEMBER_MAX_BYTES} bytes), or a file "
    "whose header cannot be read within the memory budget (a Deflated DICOM or .gz bomb)",
    "zip-bomb": f"a zip member past {ZIP_RATIO_MIN_BYTES} bytes compressed more than {ZIP_MAX_RATIO}:1",
    "nested-zip": "a zip archive inside a zip archive (not scanned)",
    "empty": "an empty file",
    "unrecognised": "neither DICOM nor NIfTI by content or name",
    "not-image": "DICOM without image data (structured report, presentation state ...)",
    "bad-header": "a reader recognised the file but could not read its header",
    "left-out": "read by a reader but part of no series (e.g. a second copy of one image)",
}


@dataclass
class ScanResult:
    """What ``scan`` found. ``files_seen`` counts every file and zip member looked at (a readable
    zip counts as its members; a folder not entered counts once); each is either a source of a
    series or in ``skipped``. ``locations`` maps labels to paths: show it only when asked."""

    series: list[SeriesRef]
    warnings: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    files_seen: int = 0
    locations: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def files_used(self) -> int:
        return len({s for ref in self.series for s in ref.sources})

    def skipped_counts(self) -> dict[str, int]:
        """How many entries were skipped, by kind (sorted by kind)."""
        return dict(sorted(Counter(s.kind for s in self.skipped).items()))


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in re.split(r"[\\/]", name) if part)


def _traversal(name: str) -> bool:
    """A member name that would land outside an extraction folder."""
    parts = re.split(r"[\\/]", name)
    return name.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:", name)) or ".." in parts


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _digest(first: bytes, size: int) -> str:
    h = hashlib.blake2b(first[:DIGEST_BYTES], digest_size=8)
    h.update(size.to_bytes(8, "little"))
    return h.hexdigest()


def _scrub(text: str, source: Source | None, extra: Iterable[str] = ()) -> str:
    """Replace any path of ``source`` that a library put in ``text`` with its label."""
    if source is None or str(source) == source.path_text:
        return text
    names = {source.path_text, str(source.path), os.path.realpath(source.path), *extra}
    if source.member:
        names |= {source.member, Path(source.member).name}
    names.add(source.path.name)
    for name in sorted((n for n in names if len(n) >= 6), key=len, reverse=True):
        text = text.replace(name, str(source))
    return text


def _reason(exc: BaseException, source: Source | None = None) -> str:
    return _scrub(one_line(exc), source)


class _Inventory:
    """Walks the inputs in a fixed (sorted, depth-first) order, labels every entry and records
    every skip, so that nothing is dropped without a reason."""

    def __init__(self, record_paths: bool) -> None:
        self.record_paths = record_paths
        self.warnings: list[str] = []
        self.skipped: list[Skipped] = []
        self.locations: dict[str, str] = {}
        self.seen = 0
        self._prefixes: set[str] = set()
        self._hidden: list[str] = []

    # ------------------------------------------------------------------ labels and skips

    def _prefix(self, raw: Path, index: int) -> str:
        name = raw.name or Path(os.path.abspath(raw)).name or str(raw)
        prefix = name if name not in self._prefixes else f"{name}[{index}]"
        self._prefixes.add(prefix)
        return prefix

    def _label(self, path: Path, member: str | None, label: str) -> str:
        text = f"{path}!{member}" if member is not None else str(path)
        label = text if self.record_paths else label
        self.locations[label] = text
        return label

    def skip(self, label: str, kind: str, reason: str, *, counted: bool = True) -> None:
        """Record a skipped entry; ``counted`` is False for files already counted as seen."""
        self.seen += counted
        self.skipped.append(Skipped(label, reason, kind))
        if kind == "hidden":
            self._hidden.append(label)
        else:
            self.warnings.append(f"{label}: {reason}")

    def finish(self) -> None:
        if self._hidden:
            n = len(self._hidden)
            self.warnings.append(
                f"{n} hidden file(s) or folder(s) ignored (names starting with '.' or __MACOSX), e.g. {self._hidden[0]}"
            )

    # ------------------------------------------------------------------ walking

    def sources(self, paths: Iterable[str | Path]) -> Iterator[tuple[Source, bytes]]:
        """Every candidate file under ``paths`` with its first bytes; zips are opened in place."""
        for index, raw in enumerate(paths, 1):
            root = Path(raw)
            if not os.path.lexists(root):
                self.warnings.append(f"{root}: no such file or folder")
                continue
            prefix = self._prefix(root, index)
            if os.path.isdir(root):
                real_root = os.path.realpath(root)
                yield from _Walk(self, real_root, prefix).folder(root, real_root, (real_root,))
            else:
                label = self._label(root, None, prefix)
                yield from self.file(root, label)

    def file(self, path: Path, label: str) -> Iterator[tuple[Source, bytes]]:
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                self.skip(label, "special", "not a regular file")
                return
            with open(path, "rb") as fh:
                head = fh.read(DIGEST_BYTES)
        except OSError as exc:
            self.skip(label, "unreadable", f"unreadable ({exc.strerror or type(exc).__name__})")
            return
        if head[:4] == b"PK\x03\x04" and zipfile.is_zipfile(path):
            yield from self.zip(path, label)
            return
        self.seen += 1
        yield Source(path, None, label, _digest(head, info.st_size)), head

    def zip(self, path: Path, zip_label: str) -> Iterator[tuple[Source, bytes]]:
        try:
            zf = zipfile.ZipFile(path)
        except _ZIP_ERRORS as exc:
            self.skip(
                zip_label, "corrupt-zip", f"unreadable zip archive ({_reason(exc, Source(path, None, zip_label))})"
            )
            return
        with zf:
            names: set[str] = set()
            infos = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename)
            for m, info in enumerate(infos, 1):
                source = Source(path, info.filename, self._label(path, info.filename, f"{zip_label}#{m}"))
                problem = _member_problem(info, names)
                names.add(info.filename)
                if problem:
                    self.skip(str(source), *problem)
                    continue
                try:
                    with zf.open(info) as fh:
                        head = fh.read(DIGEST_BYTES)
                except _ZIP_ERRORS as exc:
                    self.skip(str(source), "unreadable", f"unreadable zip member ({_reason(exc, source)})")
                    continue
                if head[:4] == b"PK\x03\x04":
                    self.skip(str(source), "nested-zip", "nested zip archives are not scanned")
                    continue
                self.seen += 1
                yield Source(path, info.filename, str(source), _digest(head, info.file_size)), head


def _member_problem(info: zipfile.ZipInfo, earlier: set[str]) -> tuple[str, str] | None:
    """Why a zip member must not be opened, checked from its directory entry alone."""
    if _traversal(info.filename):
        return "zip-traversal", "zip member named outside the archive ('..' or an absolute path); not opened"
    if _hidden(info.filename):
        return "hidden", "hidden zip member"
    if info.filename in earlier:
        return "already-seen", "a second zip member with the same name; not opened"
    if info.flag_bits & 0x1:
        return "encrypted", "encrypted zip member; not opened"
    if info.file_size > ZIP_MEMBER_MAX_BYTES:
        return "too-large", f"zip member declares {info.file_size} bytes (limit {ZIP_MEMBER_MAX_BYTES}); not opened"
    if ratio_problem(info.file_size, info.compress_size):
        ratio = info.file_size / max(info.compress_size, 1)
        return "zip-bomb", f"zip member compressed {ratio:.0f}:1 (limit {ZIP_MAX_RATIO}:1); not opened"
    return None


class _Walk:
    """One folder root: follows symlinks that stay inside it, once each, and numbers entries."""

    def __init__(self, inv: _Inventory, real_root: str, prefix: str) -> None:
        self.inv, self.real_root, self.prefix, self.counter = inv, real_root, prefix, itertools.count(1)
        self.dirs: set[str] = {real_root}
        self.files: dict[str, str] = {}

    def _label(self, path: Path) -> str:
        return self.inv._label(path, None, f"{self.prefix}#{next(self.counter)}")

    def folder(self, path: Path, real: str, parents: tuple[str, ...]) -> Iterator[tuple[Source, bytes]]:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            label = self.prefix if real == self.real_root else self._label(path)
            self.inv.skip(label, "unreadable", f"unreadable folder ({exc.strerror or type(exc).__name__})")
            return
        for entry in entries:
            yield from self.entry(Path(entry.path), entry, os.path.join(real, entry.name), parents)

    def entry(
        self, path: Path, entry: os.DirEntry, real: str, parents: tuple[str, ...]
    ) -> Iterator[tuple[Source, bytes]]:
        if _hidden(entry.name):
            self.inv.skip(self._label(path), "hidden", "hidden")
            return
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError as exc:
            self.inv.skip(self._label(path), "unreadable", f"unreadable ({exc.strerror})")
            return
        if is_link:
            real = os.path.realpath(path)
            if not os.path.exists(real):
                self.inv.skip(self._label(path), "broken-symlink", "symlink to nothing (broken or circular)")
                return
            if not _inside(real, self.real_root):
                self.inv.skip(
                    self._label(path), "symlink-outside", "symlink to a place outside the archive; not followed"
                )
                return
            is_dir = os.path.isdir(real)
        if is_dir:
            yield from self.subfolder(path, real, parents, is_link)
            return
        label = self._label(path)
        if real in self.files:
            self.inv.skip(label, "already-seen", f"same file as {self.files[real]}; not read twice")
            return
        self.files[real] = label
        yield from self.inv.file(path, label)

    def subfolder(
        self, path: Path, real: str, parents: tuple[str, ...], is_link: bool
    ) -> Iterator[tuple[Source, bytes]]:
        if real in parents:
            self.inv.skip(
                self._label(path), "symlink-loop", "symlinked folder leads back to a parent folder; not followed"
            )
            return
        if real in self.dirs:
            self.inv.skip(self._label(path), "already-seen", "folder already scanned under another name")
            return
        if (path / "zarr.json").exists():
            self.inv.skip(self._label(path), "zarr-store", "a Zarr store, never input")
            return
        self.dirs.add(real)
        yield from self.folder(path, real, (*parents, real))


def iter_sources(
    paths: Iterable[str | Path],
    warnings: list[str],
    skipped: list[Skipped] | None = None,
    *,
    record_paths: bool = False,
) -> Iterator[tuple[Source, bytes]]:
    """Every candidate file under ``paths`` with its first bytes; skips go to ``warnings`` (and
    ``skipped`` when given)."""
    inv = _Inventory(record_paths)
    yield from inv.sources(paths)
    inv.finish()
    warnings.extend(inv.warnings)
    if skipped is not None:
        skipped.extend(inv.skipped)


def _readers() -> dict[str, Any]:
    from .plugins import get_readers

    return {name: reg.obj for name, reg in sorted(get_readers().items())}


def scan(
    paths: Iterable[str | Path],
    *,
    with_patient_age: bool = False,
    record_paths: bool = False,
    max_series_bytes: int | str | None = None,
) -> ScanResult:
    """Find every DICOM/NIfTI series under ``paths`` (files, folders, zip archives).

    Never raises on bad input: every file that no series uses is in ``skipped`` (and a line in
    ``warnings``), and series that will not load cleanly carry ``problems``. Files are named by
    label unless ``record_paths``. Patient age is recorded in ``meta`` only when
    ``with_patient_age`` is set. ``max_series_bytes`` is the per-series memory budget
    (:mod:`engine.memory_budget`; default min(2 GiB, a quarter of RAM)): a file whose header
    cannot be read within it is skipped (``too-large``), a series that needs more is listed with
    that problem and fails at load.
    """
    budget = memory_budget.resolve(max_series_bytes)
    with memory_budget.scoped(budget):
        result = _scan(paths, with_patient_age, record_paths)
    for ref in result.series:
        ref.max_bytes = budget
        if ref.needs_bytes is not None and ref.needs_bytes > budget:
            ref.problems.append(str(memory_budget.over_budget(f"series {ref.key}", ref.needs_bytes, budget)))
    return result


def _scan(paths: Iterable[str | Path], with_patient_age: bool, record_paths: bool) -> ScanResult:
    readers = _readers()
    inv = _Inventory(record_paths)
    records: dict[str, list[Any]] = {name: [] for name in readers}
    read: list[Source] = []
    for source, head in inv.sources(paths):
        if not head:
            inv.skip(str(source), "empty", "empty file", counted=False)
            continue
        reader = next((r for r in readers.values() if r.sniff(source, head[:HEAD_BYTES])), None)
        if reader is None:
            inv.skip(str(source), "unrecognised", "not a DICOM or NIfTI file (skipped)", counted=False)
            continue
        try:
            record = reader.scan_file(source, with_patient_age=with_patient_age)
        except Exception as exc:  # one bad file must not stop the scan
            reason = _reason(exc, source)
            kind = "not-image" if reason.startswith("no image data") else "bad-header"
            kind = "too-large" if isinstance(exc, memory_budget.OverBudget) else kind
            inv.skip(str(source), kind, f"skipped {reader.name} file ({reason})", counted=False)
            continue
        if record is None:
            inv.skip(str(source), "left-out", f"the {reader.name} reader kept nothing from it", counted=False)
            continue
        records[reader.name].append(record)
        read.append(source)
    series = _group(readers, records, inv)
    _dedupe_keys(series)
    used = {s for ref in series for s in ref.sources}
    for source in read:
        if source not in used:
            inv.skip(
                str(source), "left-out", "read, but part of no series (e.g. a second copy of one image)", counted=False
            )
    inv.finish()
    return ScanResult(series, inv.warnings, inv.skipped, inv.seen, inv.locations)


def _group(readers: dict[str, Any], records: dict[str, list[Any]], inv: _Inventory) -> list[SeriesRef]:
    series: list[SeriesRef] = []
    for name, reader in readers.items():
        if not records[name]:
            continue
        try:
            series.extend(reader.group(records[name]))
        except Exception as exc:  # a broken reader plugin loses its own files, never the scan
            inv.warnings.append(f"the {name} reader could not group its {len(records[name])} file(s) ({_reason(exc)})")
    return series


def _dedupe_keys(series: list[SeriesRef]) -> None:
    seen: dict[str, int] = {}
    for ref in series:
        if ref.key in seen:
            seen[ref.key] += 1
            ref.key = f"{ref.key}-{seen[ref.key]}"
        else:
            seen[ref.key] = 0


def load(ref: SeriesRef) -> Volume:
    """Load a series as a :class:`Volume` with the reader that found it.

    Raises :class:`LoadError` (naming the file by label and the reason) for every bad input,
    and :class:`~engine.memory_budget.OverBudget` before decoding a series whose headers declare
    more than the budget it was scanned under (``ref.max_bytes``).
    """
    readers = _readers()
    if ref.reader not in readers:
        raise LoadError(f"series {ref.key}: no reader named {ref.reader!r} is installed")
    budget = memory_budget.resolve(ref.max_bytes)
    if ref.needs_bytes is not None:  # before any pixel data is decoded or inflated
        memory_budget.check(f"series {ref.key}", ref.needs_bytes, budget)
    try:
        with memory_budget.scoped(budget):
            return readers[ref.reader].load(ref)
    except InputError as exc:  # LoadError, GeometryError ...: keep the type, scrub the text
        clean = _scrub_all(str(exc), ref.sources)
        if clean == str(exc):
            raise
        try:
            scrubbed = type(exc)(clean)
        except Exception:  # a subclass with another constructor
            scrubbed = LoadError(clean)
        raise scrubbed from exc
    except Exception as exc:  # decoders raise many types; callers need one
        first = ref.sources[0] if ref.sources else ref.key
        raise LoadError(_scrub_all(f"{first}: cannot load series {ref.key} ({_reason(exc)})", ref.sources)) from exc


def _scrub_all(text: str, sources: list[Source]) -> str:
    """Reader messages may quote a library's error with a path in it; labels replace paths."""
    for source in sources:
        if source.path_text in text or (source.member and source.member in text) or source.path.name in text:
            text = _scrub(text, source)
    return text
