"""Sources: where series come from. An archive argument is a path (folder, zip, file) or a URL
(``dicomweb+http(s)://HOST:PORT/ROOT``, ``dimse://CALLED_AE@HOST:PORT``); each source plugin
(``register_sources``) claims the arguments it understands and turns them into series refs.

A PACS source lists series cheaply (QIDO-RS, C-FIND) as :class:`RemoteRef` objects; nothing is
fetched until a loader asks for that series, so a fetch never waits for other series. The loader
(the built-in ``pacs`` reader) fetches one series into a bounded temporary spool folder, reads it
with the DICOM reader, and deletes the spool again. The store records a PACS source as a URL
without credentials or query values (:func:`public_url`), and each series records a digest of the
SOP Instance UIDs it was computed from, so resume redoes a series whose instances changed.

Credentials never come from the command line or go into the store: see :func:`http_session`.
"""

from __future__ import annotations

import contextlib
import hashlib
import netrc
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

from .discover import LoadError, ScanResult, SeriesRef
from .errors import SourceError, UsageError
from .series_stream import SeriesStream

# A series larger than this is refused while it is fetched (not after): the spool stays bounded.
SPOOL_MAX_BYTES = int(os.environ.get("MRFM_SPOOL_MAX_BYTES", str(8 * 1024**3)))
PACS_READER = "pacs"


@dataclass(frozen=True)
class SourceOptions:
    """What a run asks of its sources beyond the archive argument."""

    where: tuple[tuple[str, str], ...] = ()  # QIDO/C-FIND matching keys (KEYWORD, VALUE)
    ae_title: str = "MRFM"  # calling AE title for DIMSE
    move: bool = False  # DIMSE: C-MOVE to our own storage SCP instead of C-GET
    move_port: int = 11113  # where that SCP listens (the PACS must know ae_title at this port)
    record_paths: bool = False
    max_series_bytes: int | None = None  # the per-series decoding budget (engine.memory_budget)


@runtime_checkable
class Source(Protocol):
    """What ``register_sources`` registers.

    ``claims(archive)`` says whether this source reads an archive argument; ``find`` lists its
    series (never fetching pixel data) as a :class:`~engine.discover.ScanResult`. A PACS source
    returns :class:`RemoteRef` series and also implements ``fetch(ref, folder)`` (write every
    instance of the series as a file into ``folder``; raise :class:`~engine.errors.SourceError`
    on a timeout, refusal or partial series) and ``instance_uids(ref)`` (the SOP Instance UIDs the
    PACS holds for the series now, for resume).
    """

    name: str

    def claims(self, archive: str) -> bool: ...

    def find(self, archive: str, options: SourceOptions) -> ScanResult: ...


@dataclass
class RemoteRef(SeriesRef):
    """A series in a PACS, found by a query and not fetched yet. ``url`` is the archive argument
    (with no credentials: they never appear there); ``source`` names the plugin that fetches it."""

    url: str = ""
    source: str = ""
    options: SourceOptions = field(default_factory=SourceOptions)
    n_instances: int = 0

    def source_record(self) -> dict[str, Any]:
        """What the store records about where the series came from: URL and count, no PHI."""
        return {"url": public_url(self.url), "count": self.n_instances, "first": self.series_uid}


def is_url(archive: str | Path) -> bool:
    return "://" in str(archive)


def public_url(url: str) -> str:
    """The URL as the store may record it: no user, password, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    if parts.scheme == "dimse" and parts.username:
        netloc = f"{parts.username}@{netloc}"  # the called AE title is an address, not a credential
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def instances_digest(sop_uids: Iterable[str]) -> str:
    """A digest of a series' SOP Instance UIDs, independent of their order."""
    h = hashlib.blake2b(digest_size=12)
    for uid in sorted(set(sop_uids)):
        h.update(uid.encode() + b"\0")
    return "blake2b:" + h.hexdigest()


def parse_where(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``KEYWORD=VALUE`` strings -> pairs; a keyword pydicom does not know is a usage error."""
    from pydicom.datadict import tag_for_keyword

    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--where {item!r}: expected KEYWORD=VALUE, e.g. Modality=MR")
        if tag_for_keyword(key) is None:
            raise UsageError(f"--where {item!r}: {key} is not a DICOM attribute keyword")
        out.append((key, value.strip()))
    return tuple(out)


# ---- finding ---------------------------------------------------------------------------------
def get_sources() -> dict[str, Any]:
    from .plugins import get_sources as registered

    return {name: reg.obj for name, reg in registered().items()}


def source_for(archive: str) -> Any:
    """The registered source that claims ``archive``; a UsageError names the installed ones."""
    sources = get_sources()
    for src in sources.values():
        if src.claims(str(archive)):
            return src
    if is_url(archive):
        scheme = str(archive).split("://", 1)[0]
        hint = (
            " (pip install 'mrfm[pacs]' for dicomweb+http(s):// and dimse://)"
            if scheme.startswith(("dicomweb", "dimse"))
            else ""
        )
        raise UsageError(
            f"{public_url(str(archive))}: no installed source reads {scheme}:// URLs{hint}; "
            f"installed: {', '.join(sorted(sources)) or 'none'}"
        )
    raise UsageError(f"{archive}: no installed source reads it")


def find(archives: Iterable[str | Path], options: SourceOptions | None = None) -> ScanResult:
    """Every series of every archive argument, each found by the source that claims it.

    Paths are scanned as today (header-only); URLs are queried. A PACS that cannot be reached or
    refuses the query raises :class:`~engine.errors.SourceError` (one line, exit 2).
    """
    options = options or SourceOptions()
    archives = [str(a) for a in archives]
    if options.where and not any(is_url(a) for a in archives):
        raise UsageError("--where filters PACS queries (dicomweb+http(s)://, dimse://); it does not apply to folders")
    merged = ScanResult([], [])
    streams: list[Any] = []  # PACS queries still paging: run as they arrive
    local = [a for a in archives if not is_url(a)]
    if local:  # one scan over all paths keeps today's labels (archive name and position)
        _merge(merged, source_for(local[0]).find(local, options))  # type: ignore[arg-type]
    for archive in archives:
        if is_url(archive):
            if urllib.parse.urlsplit(archive).password or (
                urllib.parse.urlsplit(archive).username and not archive.startswith("dimse://")
            ):
                raise UsageError(
                    f"{public_url(archive)}: credentials never go on the command line; "
                    "set MRFM_DICOMWEB_TOKEN, MRFM_DICOMWEB_USER/MRFM_DICOMWEB_PASSWORD or a netrc file"
                )
            _merge(merged, source_for(archive).find(archive, options), streams)
    if streams:
        merged.series = SeriesStream.chain([merged.series, *streams])  # type: ignore[assignment]
    return merged


def _merge(into: ScanResult, found: ScanResult, streams: list[Any] | None = None) -> None:
    if isinstance(found.series, SeriesStream) and streams is not None:
        streams.append(found.series)
    else:
        into.series.extend(found.series)
    into.warnings.extend(found.warnings)
    into.skipped.extend(found.skipped)
    into.files_seen += found.files_seen
    into.locations.update(found.locations)


def archive_labels(archives: Iterable[str | Path]) -> list[str]:
    """How a run records its archive arguments: paths absolutely (the root only, never a path below
    it), URLs without credentials or query."""
    return [public_url(str(a)) if is_url(a) else os.path.abspath(a) for a in archives]


# ---- resume ----------------------------------------------------------------------------------
def changed_at_source(
    refs: list[Any], store: Any, todo: dict[str, set[str]], head_fps: dict[str, str]
) -> dict[str, set[str]]:
    """Resume for PACS series: one that looks done is redone when the SOP instances the PACS
    holds now differ from those it was computed from (a listing, never a fetch)."""
    sources = None
    for ref in refs:
        if not isinstance(ref, RemoteRef) or todo.get(ref.key):
            continue
        stored = (store.series_attrs(ref.key) or {}).get("load_notes") or {}
        sources = sources or get_sources()
        try:
            now = instances_digest(sources[ref.source].instance_uids(ref))
        except Exception:  # cannot list it now: keep the stored result rather than lose it
            continue
        if stored.get("instances_digest") != now:
            todo[ref.key] = set(head_fps)
    return todo


# ---- fetching --------------------------------------------------------------------------------
class Spool:
    """A temporary folder one series is fetched into; ``add`` refuses bytes past the bound, and
    past the series budget (``budget``, with ``where`` naming the series for its message)."""

    def __init__(
        self, folder: Path, max_bytes: int = SPOOL_MAX_BYTES, budget: int | None = None, where: str = ""
    ) -> None:
        self.folder, self.max_bytes, self.bytes, self.sop_uids = folder, max_bytes, 0, []
        self.budget, self.where = budget, where
        self.over: Exception | None = None  # the budget error, kept: a protocol library may wrap what add raises

    def add(self, dataset: Any) -> Path:
        """Write one pydicom dataset (with file meta) as ``<SOPInstanceUID>.dcm``."""
        import pydicom

        uid = str(dataset.SOPInstanceUID)
        path = self.folder / f"{len(self.sop_uids):06d}.dcm"
        if not getattr(dataset, "file_meta", None) or "TransferSyntaxUID" not in dataset.file_meta:
            from pydicom.dataset import FileMetaDataset

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = dataset.SOPClassUID
            meta.MediaStorageSOPInstanceUID = uid
            meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            dataset.file_meta = meta
        pydicom.dcmwrite(path, dataset, enforce_file_format=True)
        self.bytes += path.stat().st_size
        self.sop_uids.append(uid)
        if self.budget is not None and self.bytes > self.budget:
            from .memory_budget import over_budget

            self.over = over_budget(
                self.where, self.bytes, self.budget, f"{len(self.sop_uids)} instance(s) fetched so far"
            )
            raise self.over
        if self.bytes > self.max_bytes:
            raise SourceError(f"series larger than the spool bound MRFM_SPOOL_MAX_BYTES ({self.max_bytes} bytes)")
        return path


@contextlib.contextmanager
def spool_folder(prefix: str = "mrfm-spool-") -> Iterator[Path]:
    base = os.environ.get("MRFM_SPOOL_DIR") or None
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fetch_local(ref: RemoteRef, folder: Path) -> tuple[SeriesRef, str]:
    """Fetch ``ref`` into ``folder`` and read it back as a local DICOM series; returns it and the
    digest of the instances fetched. Raises LoadError naming the series and the reason."""
    from .discover import scan

    where = f"{public_url(ref.url)} series {ref.series_uid}"
    src = get_sources().get(ref.source)
    if src is None:
        raise LoadError(f"{where}: no installed source named {ref.source!r}")
    from .memory_budget import resolve

    budget = resolve(ref.options.max_series_bytes)
    check_declared_size(src, ref, where, budget)
    spool = Spool(folder, budget=budget, where=where)
    try:
        src.fetch(ref, spool)
    except Exception as exc:
        if spool.over is not None:  # over budget while fetching, however the library reported it
            raise spool.over from None
        _fetch_failed(where, exc)
    if not spool.sop_uids:
        raise LoadError(f"{where}: fetch returned no instances")
    if ref.n_instances and len(set(spool.sop_uids)) < ref.n_instances:
        raise LoadError(f"{where}: partial fetch ({len(set(spool.sop_uids))} of {ref.n_instances} instances)")
    found = [r for r in scan([folder], max_series_bytes=budget).series if r.series_uid == ref.series_uid]
    if not found:
        raise LoadError(f"{where}: the fetched instances hold no loadable series")
    local = found[0]
    local.key = ref.key
    return local, instances_digest(spool.sop_uids)


def _fetch_failed(where: str, exc: Exception) -> None:
    if isinstance(exc, (SourceError, LoadError)):
        raise LoadError(f"{where}: fetch failed ({exc})") from exc
    # a protocol library's own error types: one reason, never a crash
    raise LoadError(
        f"{where}: fetch failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    ) from exc


def declared_bytes(instances: list[dict[str, Any]]) -> tuple[int, str] | None:
    """Bytes loading a series needs by what the PACS declares of each instance (Rows, Columns,
    NumberOfFrames, BitsAllocated), and a description; None when it declares no sizes."""
    from .memory_budget import series_need

    voxels = stored = 0
    shapes = set()
    for inst in instances:
        try:
            rows, cols = int(inst.get("Rows") or 0), int(inst.get("Columns") or 0)
            frames, bits = max(1, int(inst.get("NumberOfFrames") or 1)), int(inst.get("BitsAllocated") or 16)
        except (TypeError, ValueError):
            return None
        if not rows or not cols:
            return None
        voxels += rows * cols * frames
        stored += rows * cols * frames * max(1, (bits + 7) // 8)
        shapes.add(f"{rows}x{cols}x{frames} {bits}-bit")
    if not instances:
        return None
    return series_need(
        stored, voxels
    ), f"{len(instances)} instance(s) of {', '.join(sorted(shapes)[:3])} as the PACS declares them"


def check_declared_size(src: Any, ref: RemoteRef, where: str, budget: int) -> None:
    """Refuse a series over the budget before fetching a byte of it: the source lists each
    instance's size attributes (QIDO-RS / C-FIND at instance level). A PACS that does not answer
    them leaves the check to the bytes fetched (:class:`Spool`)."""
    from .memory_budget import check

    listing = getattr(src, "image_attributes", None)
    if listing is None:
        return
    try:
        instances = listing(ref)
    except Exception:  # the fetch that follows reports an unreachable server with its reason
        return
    declared = declared_bytes(instances)
    if declared is not None:
        check(where, declared[0], budget, declared[1])


class PacsReader:
    """The loader side of PACS sources: ``load`` fetches, reads and releases one series. It never
    claims a file on disk (``sniff`` is always False)."""

    name = PACS_READER

    def sniff(self, source: Any, head: bytes) -> bool:
        return False

    def scan_file(self, source: Any, *, with_patient_age: bool) -> None:
        return None

    def group(self, records: list) -> list[SeriesRef]:
        return []

    def load(self, ref: RemoteRef) -> Any:
        from .discover import load

        with spool_folder() as folder:
            local, digest = fetch_local(ref, folder)
            volume = load(local)
        volume.meta["instances_digest"] = digest
        volume.meta["instances"] = len(local.sources)
        return volume


def materialise(ref: Any, keep: list[Any]) -> Any:
    """A local SeriesRef for ``ref``: itself when it is on disk, else fetched into a spool folder
    that lives as long as ``keep`` holds it (exports read the source headers from it)."""
    if not isinstance(ref, RemoteRef):
        return ref
    stack = contextlib.ExitStack()
    folder = stack.enter_context(spool_folder("mrfm-export-"))
    keep.append(stack)
    return fetch_local(ref, folder)[0]


def ref_from_attrs(attrs: dict[str, Any], options: SourceOptions | None = None) -> RemoteRef | None:
    """The PACS series a stored series came from (its source URL and UIDs), or None."""
    url = (attrs.get("source") or {}).get("url")
    if not url:
        return None
    src = source_for(url)
    return RemoteRef(
        key=attrs.get("series_key") or "",
        reader=PACS_READER,
        study_uid=attrs.get("study_uid") or "",
        series_uid=attrs.get("series_uid") or "",
        modality=attrs.get("modality") or "",
        description=attrs.get("description") or "",
        sources=[],
        dims=(),
        n_slices=0,
        orientation="",
        url=url,
        source=src.name,
        options=options or SourceOptions(),
        n_instances=int((attrs.get("source") or {}).get("count") or 0),
    )


# ---- credentials -----------------------------------------------------------------------------
def http_session(url: str) -> Any:
    """A requests session for a DICOMweb server: credentials from the environment or a netrc
    file, TLS verified (``MRFM_CA_BUNDLE`` names a CA file; verification is never switched off).

    ``MRFM_DICOMWEB_TOKEN`` -> bearer token; ``MRFM_DICOMWEB_USER`` + ``MRFM_DICOMWEB_PASSWORD``
    -> basic; else the ``machine`` entry for the host in ``MRFM_NETRC``, ``NETRC`` or ~/.netrc.
    """
    import requests

    session = requests.Session()
    host = urllib.parse.urlsplit(url).hostname or ""
    token = os.environ.get("MRFM_DICOMWEB_TOKEN")
    user, password = os.environ.get("MRFM_DICOMWEB_USER"), os.environ.get("MRFM_DICOMWEB_PASSWORD")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user is not None:
        session.auth = (user, password or "")
    else:
        found = _netrc_login(host)
        if found:
            session.auth = found
    session.trust_env = True  # a netrc file, proxies and REQUESTS_CA_BUNDLE as requests reads them
    ca = os.environ.get("MRFM_CA_BUNDLE")
    session.verify = ca if ca else True
    return session


def _netrc_login(host: str) -> tuple[str, str] | None:
    path = os.environ.get("MRFM_NETRC") or os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError) as exc:
        raise UsageError(f"netrc file {path}: cannot be read ({exc})") from exc
    return (entry[0], entry[2] or "") if entry else None


__all__ = [
    "RemoteRef",
    "Source",
    "SourceOptions",
    "find",
    "get_sources",
    "instances_digest",
    "is_url",
    "parse_where",
    "public_url",
]
