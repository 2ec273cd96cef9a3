"""Exports made while a run goes (``mrfm run --export``): the formats checked before the run
starts, one session per format, each series exported as soon as it is done, and the sessions
closed at the end. An exporter that fails costs a warning, never the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import UsageError
from .plugins import get_exporters
from .store import ResultStore

Event = dict[str, Any]


def check_exporters(names: list[str]) -> None:
    """A usage error naming every --export format no installed exporter writes."""
    if not names:
        return

    known = get_exporters()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"unknown export format(s) {', '.join(unknown)}; installed: {', '.join(sorted(known)) or 'none'}"
        )


def open_export_sessions(
    store: ResultStore, out: str | Path, names: list[str], export_dir: str | Path | None, to: str | None = None
) -> list[Any]:
    """One export session per format; each folder defaults to ``<out>-<format>`` beside the store."""
    from .export import ExportSession  # export loads only when a run exports

    base = local_path(out)
    return [
        ExportSession(
            store, name, Path(export_dir) / name if export_dir else base.with_name(f"{base.name}-{name}"), to=to
        )
        for name in names
    ]


def export_series(sessions: list[Any], key: str, ref: Any, warnings: list[str], emit: Callable[[Event], None]) -> None:
    """Export a series just written (or found complete); a failure is reported, not fatal."""
    for session in sessions:
        try:
            res = session.series(key, source=ref)
        except Exception as exc:  # an exporter bug must not cost the run
            res = type("R", (), {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"})()
        if res.status == "failed":
            msg = f"export {session.exporter.name} of {key} failed: {res.reason}"
            warnings.append(msg)
            emit({"event": "warning", "message": msg})


def close_export(session: Any, warnings: list[str], emit: Callable[[Event], None]) -> None:
    """Finish one export session (its table, its last sends); a failure is a warning of the run."""
    try:
        session.close()
    except Exception as exc:
        msg = f"export {session.exporter.name}: could not finish ({type(exc).__name__}: {exc})"
        warnings.append(msg)
        emit({"event": "warning", "message": msg})


def local_path(out: str | Path) -> Path:
    """The folder a local ``--out`` (a path or a file:// URL) names."""
    text = str(out)
    return Path(text.removeprefix("file://"))
