"""Exporting a result store: DICOM SEG/SR, NIfTI, OME-Zarr, tables — through the exporters hook.

An exporter is an object registered with ``register_exporters`` (see :class:`Exporter`). The
driver here picks the series, gives each exporter an :class:`ExportContext`, isolates failures per
series, and keeps a small manifest in the output folder (``mrfm-export.json``) so a second export
skips every series whose outputs it already wrote with the same fingerprint.

PHI: DICOM exports carry the patient and study modules of their source images, because DICOM
requires a derived object to belong to its source's patient and study. Every other export carries
no patient attribute and no file-system path: UIDs, series keys, descriptions and PHI-safe source
labels only, as in the store.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import click
import numpy as np

from .disk_full import disk_full_is_store_error
from .errors import DiskFull, SkipSeries, StoreError, UsageError, one_line
from .export_paths import source_roots
from .faults import killpoint
from .fingerprint import json_digest
from .out_folders import check_export_folder
from .safe_paths import check_under, inside, is_safe_name, safe_name

MANIFEST = "mrfm-export.json"
MANIFEST_VERSION = 1


@runtime_checkable
class Exporter(Protocol):
    """What ``register_exporters`` registers.

    ``name`` is the ``--format`` value; ``version`` enters the export fingerprint (bump it when the
    files an exporter writes change). ``export_series`` writes one series' files under
    ``ctx.out_dir`` and returns their paths; it raises to fail that series (others go on).
    An exporter may also define ``finish(ctx, keys) -> list[Path]``, called once after all series
    (e.g. to gather per-series table parts into one file per kind).
    """

    name: str
    description: str
    version: str

    def export_series(self, ctx: "ExportContext", key: str) -> list[Path]: ...


@dataclass
class SeriesExport:
    """The outcome for one series: ``exported``, ``up-to-date`` (skipped by the manifest),
    ``failed`` (with its reason) or ``skipped`` (not complete in the store, or nothing to export)."""

    key: str
    status: str
    files: list[str] = field(default_factory=list)
    reason: str | None = None
    seconds: float = 0.0


@dataclass
class ExportSummary:
    format: str
    out_dir: Path
    results: list[SeriesExport]
    files: list[str] = field(default_factory=list)  # written by finish()
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        return 1 if any(r.status == "failed" for r in self.results) else 0


class ExportContext:
    """What an exporter sees: the store, the out folder, the selected heads, the archive and options.

    Source files are found on demand: the archive roots recorded in the store's runs (or the
    ``archive`` given) are scanned once, header-only, and series matched by SeriesInstanceUID.
    """

    def __init__(
        self,
        store: Any,
        out_dir: Path,
        fmt: str,
        *,
        heads: Iterable[str] | None = None,
        archive: Iterable[str | Path] | None = None,
        options: dict[str, Any] | None = None,
        manifest: dict[str, Any] | None = None,
    ):
        self.store = store
        self.out_dir = Path(out_dir)
        self.format = fmt
        self.heads = set(heads) if heads else None
        self.archive = [Path(p) for p in archive] if archive else None
        self.options = dict(options or {})
        self.manifest = manifest if manifest is not None else {}
        self._attrs: dict[str, dict[str, Any]] = {}
        self._refs: dict[str, Any] | None = None
        self._scanned: set[Path] = set()
        self.refused_roots: list[str] = []
        self._spools: list[Any] = []  # PACS sources fetched for their headers, released with the context

    # ---- store -----------------------------------------------------------------------------
    def attrs(self, key: str) -> dict[str, Any]:
        if key not in self._attrs:
            self._attrs[key] = self.store.series_attrs(key) or {}
        return self._attrs[key]

    def outputs(self, key: str, kinds: Iterable[str] | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(head, output, output attrs) of a series' stored outputs, heads filtered by selection."""
        wanted = set(kinds) if kinds else None
        group = self.store.root["series"][key]
        for head, info in sorted((self.attrs(key).get("heads") or {}).items()):
            if (self.heads and head not in self.heads) or not isinstance(info, dict) or info.get("error"):
                continue
            # names become file names: checked before anything is read or written
            safe_name(head, f"series/{key}: head name")
            for name in info.get("outputs") or []:
                safe_name(name, f"series/{key}/{head}: output name")
                try:
                    node_attrs = dict(group[head][name].attrs)
                except KeyError:
                    continue
                if wanted is None or node_attrs.get("kind") in wanted:
                    yield head, name, node_attrs

    def read(self, key: str, head: str, output: str) -> Any:
        return self.store.read_output(key, head, output)

    def run(self, run_id: str | None) -> dict[str, Any]:
        return self.store.runs().get(run_id or "", {}) if run_id else {}

    def model(self, key: str) -> dict[str, Any]:
        return self.run(self.attrs(key).get("run_id")).get("model") or dict(self.store.root.attrs).get("model") or {}

    def series_dir(self, key: str) -> Path:
        """``out_dir/key``, created; the key is checked as a plain name and the folder (even one
        a symlink stands for) to lie under ``out_dir``."""
        d = inside(self.out_dir, key, what="series key")
        d.mkdir(parents=True, exist_ok=True)
        return check_under(self.out_dir, d)

    def path(self, *names: str) -> Path:
        """A file or folder under ``out_dir``: each name plain, the resolved path inside ``out_dir``.
        Exporters build every path they write through this (or series_dir)."""
        return inside(self.out_dir, *names, what="export file name")

    def series_file(self, key: str, name: str) -> Path:
        """A file in the series' folder: ``name`` plain, the path (a symlink already there too)
        inside ``out_dir``."""
        return inside(self.series_dir(key), name, what="export file name")

    def exported(self, fmt: str, key: str) -> list[Path]:
        """Files another format wrote for ``key`` into this out folder (e.g. the SR finds the SEG);
        the manifest is read from the folder, so its names are checked to stay inside it."""
        record = (self.manifest.get("formats", {}).get(fmt, {}).get("series", {})).get(key) or {}
        files = record.get("files", []) if isinstance(record, dict) else []
        return [self.out_dir / f for f in files if _within(self.out_dir, f) and (self.out_dir / f).is_file()]

    # ---- sources ---------------------------------------------------------------------------
    def archive_roots(self) -> list[Path]:
        """Where sources are looked for: ``archive`` as given, else the roots recorded in the
        store's runs that exist and are folders or archive files, never a file-system root."""
        if self.archive:
            return source_roots(self.archive, recorded=False)[0]
        recorded = [p for attrs in self.store.runs().values() for p in (attrs.get("config") or {}).get("paths") or []]
        roots, self.refused_roots = source_roots(recorded, recorded=True)
        return roots

    def add_source(self, key: str, ref: Any) -> None:
        """Tell the context where a series' files are (skips scanning the archive for it)."""
        if self._refs is None:
            self._refs = {}
        self._refs[self.attrs(key).get("series_uid") or key] = ref
        self._refs[key] = ref

    def source(self, key: str) -> Any:
        """The SeriesRef (engine.discover) of a stored series, found in the archive by its UID."""
        attrs = self.attrs(key)
        refs = self._refs = self._refs or {}
        uid = attrs.get("series_uid") or key
        # roots are scanned (headers only, once each) in order, only until the series is found
        for root in self.archive_roots():
            if uid in refs or key in refs:
                break
            if root in self._scanned:
                continue
            from .discover import (
                scan,
            )  # exports load the store and readers when they run; plugins import this module for its types

            self._scanned.add(root)
            for ref in scan([root]).series:
                refs.setdefault(ref.series_uid or ref.key, ref)
                refs.setdefault(ref.key, ref)
        ref = refs.get(uid) or refs.get(key)
        if ref is None and (attrs.get("source") or {}).get("url"):
            from .sources import ref_from_attrs

            ref = ref_from_attrs(attrs)
        if ref is not None and getattr(ref, "url", None):  # a PACS series: fetched once, for its headers
            from .sources import materialise

            ref = self._refs[key] = self._refs[attrs.get("series_uid") or key] = materialise(ref, self._spools)
        if ref is None:
            where = "--archive" if self.archive else "the archive roots recorded in the store's runs"
            refused = (
                f" (not searched: {'; '.join(self.refused_roots)})" if self.refused_roots and not self.archive else ""
            )
            raise UsageError(f"series {key}: its source files are not under {where}{refused}; pass --archive")
        return ref

    def volume(self, key: str) -> Any:
        """The source series loaded as an engine Volume (image data and affine)."""
        from .discover import (
            load,
        )  # exports load the store and readers when they run; plugins import this module for its types

        return load(self.source(key))


# ---- driver ----------------------------------------------------------------------------------
def get_exporter(fmt: str) -> Exporter:
    from .plugins import get_exporters  # the plugin manager loads exporter plugins, which import engine

    found = get_exporters()
    if fmt not in found:
        raise UsageError(f"unknown export format {fmt!r}; installed: {', '.join(sorted(found)) or 'none'}")
    return found[fmt].obj


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"version": MANIFEST_VERSION, "formats": {}}
    return (
        data
        if isinstance(data, dict) and isinstance(data.get("formats"), dict)
        else {"version": MANIFEST_VERSION, "formats": {}}
    )


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    # write-then-rename: an interrupted export never leaves a half-written manifest, and a failed
    # write (a full disk) leaves no temporary file
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        with disk_full_is_store_error(out_dir):
            killpoint("export-write")
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, out_dir / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)


def export_fingerprint(exporter: Exporter, ctx: ExportContext, key: str) -> str:
    """What an export depends on: exporter and version, the series' head records, heads and options."""
    attrs = ctx.attrs(key)
    heads = {
        h: {"fingerprint": r.get("fingerprint"), "run_id": r.get("run_id")}
        for h, r in sorted((attrs.get("heads") or {}).items())
        if isinstance(r, dict) and (ctx.heads is None or h in ctx.heads)
    }
    basis = {
        "format": exporter.name,
        "version": getattr(exporter, "version", "0"),
        "series": attrs.get("fingerprint"),
        "written": attrs.get("written"),
        "heads": heads,
        "options": ctx.options,
    }
    return "sha256:" + json_digest(basis)


def _up_to_date(record: dict[str, Any] | None, fp: str, out_dir: Path) -> bool:
    return (
        isinstance(record, dict)
        and record.get("fingerprint") == fp
        and all(_within(out_dir, f) and (out_dir / f).exists() for f in record.get("files", []))
    )


def _within(out_dir: Path, name: Any) -> bool:
    """Whether a file name read from the manifest is relative and resolves inside ``out_dir``."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    try:
        check_under(out_dir, out_dir / name)
    except StoreError:
        return False
    return True


def _relative(paths: Iterable[Path], out_dir: Path) -> list[str]:
    return sorted({str(Path(p).resolve().relative_to(out_dir.resolve())) for p in paths})


class ExportSession:
    """One export of a store into one out folder: ``series(key)`` per series, then ``close()``.

    ``mrfm run --export`` holds one open while the run writes (each series exported as it
    completes); :func:`export` is the batch form.
    """

    def __init__(
        self,
        store: Any,
        fmt: str,
        out_dir: str | Path,
        *,
        heads: Iterable[str] | None = None,
        archive: Iterable[str | Path] | None = None,
        options: dict[str, Any] | None = None,
        on_event: Callable[[SeriesExport], None] | None = None,
        to: str | None = None,
    ):
        from .store import (
            ResultStore,
            open_store,
        )  # exports load the store and readers when they run; plugins import this module for its types

        self.store = store if isinstance(store, ResultStore) else open_store(store, "r")
        self.exporter = get_exporter(fmt)
        self.sender = None
        if to:  # checked before anything is written: an unknown scheme is a usage error
            from .export_send import Sender

            self.sender = Sender(to)
        self.out_dir = Path(out_dir)
        check_export_folder(self.out_dir, MANIFEST)  # never write among a user's own files
        try:
            with disk_full_is_store_error(self.out_dir):
                self.out_dir.mkdir(parents=True, exist_ok=True)
        except DiskFull:
            raise
        except OSError as exc:
            raise UsageError(f"--out {self.out_dir}: cannot create the export folder ({exc.strerror})") from exc
        self.manifest = _read_manifest(self.out_dir)
        if not (self.out_dir / MANIFEST).exists():  # claimed at once: a later export knows the folder is mrfm's
            _write_manifest(self.out_dir, self.manifest)
        self.ctx = ExportContext(
            self.store, self.out_dir, fmt, heads=heads, archive=archive, options=options, manifest=self.manifest
        )
        self.on_event = on_event
        self.results: list[SeriesExport] = []
        self._t0 = time.perf_counter()

    @property
    def _records(self) -> dict[str, Any]:
        fmt = self.manifest["formats"].setdefault(self.exporter.name, {"series": {}})
        return fmt.setdefault("series", {})

    def series(self, key: str, source: Any = None) -> SeriesExport:
        """Export one series unless the manifest shows it done; never raises for a series' error.

        ``source``: the series' SeriesRef when the caller has it (a run does), so no archive scan.
        """
        t0 = time.perf_counter()
        if source is not None:
            self.ctx.add_source(key, source)
        self.ctx._attrs.pop(key, None)  # a run may have just rewritten it
        attrs = self.ctx.attrs(key)
        if attrs.get("status") != "complete":
            result = SeriesExport(key, "skipped", reason=f"series is {attrs.get('status') or 'absent'} in the store")
        else:
            fp = export_fingerprint(self.exporter, self.ctx, key)
            record = self._records.get(key)
            if _up_to_date(record, fp, self.out_dir):
                result = SeriesExport(key, "up-to-date", files=list(record["files"]), reason=record.get("skipped"))
            else:
                result = self._export(key, fp)
            if self.sender is not None and result.status in ("exported", "up-to-date") and result.files:
                self._send(key, result)
        result.seconds = time.perf_counter() - t0
        self.results.append(result)
        if self.on_event:
            self.on_event(result)
        return result

    def _export(self, key: str, fp: str) -> SeriesExport:
        try:
            with disk_full_is_store_error(self.out_dir):  # a full disk ends the export (exit 3), not one series
                killpoint("export-write")
                files = _relative(self.exporter.export_series(self.ctx, key), self.out_dir)
        except (KeyboardInterrupt, DiskFull):
            raise
        except SkipSeries as exc:
            self._records[key] = {"fingerprint": fp, "files": [], "exported": _now(), "skipped": str(exc)}
            _write_manifest(self.out_dir, self.manifest)
            return SeriesExport(key, "skipped", reason=str(exc))
        except Exception as exc:  # one series' failure never stops the export
            self._records.pop(key, None)
            _write_manifest(self.out_dir, self.manifest)
            return SeriesExport(key, "failed", reason=one_line(exc, named=True))
        self._records[key] = {"fingerprint": fp, "files": files, "exported": _now()}
        _write_manifest(self.out_dir, self.manifest)
        return SeriesExport(
            key, "exported" if files else "skipped", files=files, reason=None if files else "no output of this kind"
        )

    def _send(self, key: str, result: SeriesExport) -> None:
        """Send the series' files to the ``to`` URL, each at most once (the manifest says which)."""
        from .export_send import send_pending

        n, failure = send_pending(
            self.sender, self._records[key], self.out_dir, lambda: _write_manifest(self.out_dir, self.manifest)
        )
        if failure:
            result.status, result.reason = "failed", failure
        elif n:
            result.status, result.reason = "sent", f"{n} file(s) to {self.sender.label}"

    def close(self) -> ExportSummary:
        for spool in self.ctx._spools:
            spool.close()
        finish = getattr(self.exporter, "finish", None)
        files: list[str] = []
        if finish is not None:
            # keys come from the manifest in the out folder: only plain names reach the store or a path
            done = [k for k in self._records if is_safe_name(k) and self.store.series_attrs(k) is not None]
            with disk_full_is_store_error(self.out_dir):
                files = _relative(finish(self.ctx, sorted(done)), self.out_dir)
            self.manifest["formats"][self.exporter.name]["finished"] = {"files": files, "at": _now()}
            _write_manifest(self.out_dir, self.manifest)
        return ExportSummary(self.exporter.name, self.out_dir, self.results, files, time.perf_counter() - self._t0)


def export(
    store_path: str | Path,
    format: str,
    out_dir: str | Path,
    *,
    series: Iterable[str] | None = None,
    heads: Iterable[str] | None = None,
    archive: Iterable[str | Path] | None = None,
    on_event: Callable[[SeriesExport], None] | None = None,
    options: dict[str, Any] | None = None,
    to: str | None = None,
) -> ExportSummary:
    """Export the complete series of a store (or ``series`` keys) in ``format`` into ``out_dir``.

    Resumable: a series whose files the manifest records with the same fingerprint is skipped.
    A series that fails is reported with its reason and never stops the others. Raises
    UsageError for an unknown format or series key, StoreError when the store cannot be read.
    """
    session = ExportSession(
        store_path, format, out_dir, heads=heads, archive=archive, options=options, on_event=on_event, to=to
    )
    present = [k for k, _ in session.store.iter_series()]
    if series:
        unknown = [k for k in series if k not in present]
        if unknown:
            raise UsageError(f"no series {', '.join(unknown)} in {session.store.path}")
        keys = list(series)
    else:
        keys = present
    for key in keys:
        session.series(key)
    return session.close()


def export_series(store: Any, key: str, format: str, out_dir: str | Path, **kwargs: Any) -> SeriesExport:
    """Export one series (no finish step): for callers that export series as a run completes them."""
    return ExportSession(store, format, out_dir, **kwargs).series(key)


def _now() -> str:
    from .store import now  # exports load the store and readers when they run; plugins import this module for its types

    return now()


# ---- helpers shared by exporters ---------------------------------------------------------------
def hex_rgb(color: str | None) -> tuple[int, int, int] | None:
    """'#rrggbb' -> (r, g, b); None when absent or malformed."""
    if not isinstance(color, str) or len(color.lstrip("#")) != 6:
        return None
    try:
        v = int(color.lstrip("#"), 16)
    except ValueError:
        return None
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


def affine_of(attrs: dict[str, Any], node_attrs: dict[str, Any] | None = None) -> np.ndarray:
    """The voxel -> RAS mm affine of a mask (its own attrs first, then the series geometry)."""
    aff = (node_attrs or {}).get("affine") or (attrs.get("geometry") or {}).get("affine")
    if aff is None:
        raise StoreError("no affine recorded for this series")
    return np.asarray(aff, dtype=np.float64)


# ---- CLI ---------------------------------------------------------------------------------------
@click.command("export")
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--format", "fmt", required=True, help="Exporter name: dicom-seg, dicom-sr, nifti, ome-zarr, table, or a plugin's."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default: STORE's folder / <store name>-<format>).",
)
@click.option(
    "--series", "series", multiple=True, help="Series key to export (repeatable; default: every complete series)."
)
@click.option("--heads", default=None, help="Comma-separated heads whose outputs to export (default: all).")
@click.option(
    "--archive",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Where the source files are (default: the archive roots recorded in the store's runs).",
)
@click.option(
    "--to",
    "to",
    metavar="URL",
    default=None,
    help="Also send the DICOM files to a PACS: dicomweb+http(s)://HOST:PORT/ROOT (STOW-RS) or dimse://AE@HOST:PORT (C-STORE); each once.",
)
def export_command(
    store: Path,
    fmt: str,
    out_dir: Path | None,
    series: tuple[str, ...],
    heads: str | None,
    archive: tuple[Path, ...],
    to: str | None,
) -> None:
    """Export a result store's series in FORMAT; resumes, and a failed series never stops the rest."""
    out = out_dir or store.parent / f"{store.name.removesuffix('.zarr')}-{fmt}"
    wanted = [h.strip() for h in heads.split(",") if h.strip()] if heads is not None else None
    if heads is not None and not wanted:
        raise UsageError(
            "--heads names no head; give head names (comma-separated), or leave --heads out to export every head"
        )

    from .terminal import printable

    def show(r: SeriesExport) -> None:
        # keys and reasons come from the store: escapes in them must not reach the terminal
        tail = f" ({printable(r.reason)})" if r.reason else ""
        click.echo(f"{r.status:>10}  {printable(r.key)}  {len(r.files)} file(s){tail}", err=True)

    summary = export(
        store, fmt, out, series=series or None, heads=wanted, archive=archive or None, on_event=show, to=to
    )
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items())) or "no series"
    click.echo(f"{printable(summary.format)}: {counts} in {summary.seconds:.1f}s -> {printable(summary.out_dir)}")
    raise SystemExit(summary.exit_code)
