"""``mrfm listen``: a DICOM node. A C-STORE SCP (pynetdicom) writes each received instance into a
bounded spool folder, one folder per study; once no instance of a study has arrived for
``idle_seconds``, the study runs through the same pipeline (and the same store lock) as
``mrfm run``, its SEG and SR are forwarded when asked, and its spool folder is released.

A study about to run is first moved aside (``.running/``), so instances that arrive meanwhile
start a new folder and run next. SIGTERM or SIGINT finish the study in flight and end with exit 0;
whatever is still spooled (received, or moved aside and not finished) runs after a restart.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from .discover import sanitise_key
from .errors import SourceError, UsageError

SPOOL_MAX_BYTES = int(os.environ.get("MRFM_LISTEN_SPOOL_MAX_BYTES", str(20 * 1024**3)))
RUNNING = ".running"


@dataclass
class ListenSummary:
    studies: list[dict[str, Any]] = field(default_factory=list)  # one per study run: key, counts, seconds
    received: int = 0
    refused: int = 0


class _Spool:
    """Received instances on disk: ``<spool>/<study>/<n>.dcm``, written whole before they count."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}  # study folder name -> monotonic time of its last instance
        self.bytes = sum(f.stat().st_size for f in folder.rglob("*.dcm")) if folder.exists() else 0
        folder.mkdir(parents=True, exist_ok=True)
        now = time.monotonic()
        for d in folder.iterdir():  # a restart resumes what an earlier listener left
            if d.is_dir() and not d.name.startswith("."):
                self.last[d.name] = now

    def store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        study = sanitise_key(str(ds.get("StudyInstanceUID", "") or "unknown-study"))
        with self.lock:
            if self.bytes > self.max_bytes:
                return 0xA700  # out of resources: the sender keeps the instance and may retry
            folder = self.folder / study
            folder.mkdir(exist_ok=True)
            name = sanitise_key(str(ds.get("SOPInstanceUID", "") or time.time_ns()))
            tmp = folder / f".{name}.part"
        ds.save_as(tmp, enforce_file_format=True)
        with self.lock:
            os.replace(tmp, folder / f"{name}.dcm")
            self.bytes += (folder / f"{name}.dcm").stat().st_size
            self.last[study] = time.monotonic()
        return 0x0000

    def idle(self, seconds: float) -> list[str]:
        now = time.monotonic()
        with self.lock:
            return sorted(s for s, t in self.last.items() if now - t >= seconds)

    def take(self, study: str) -> Path:
        """Move a study aside to run it; instances arriving now start a new folder."""
        with self.lock:
            running = self.folder / RUNNING
            running.mkdir(exist_ok=True)
            dest = running / f"{study}-{time.time_ns()}"
            os.replace(self.folder / study, dest)
            self.last.pop(study, None)
            return dest

    def release(self, folder: Path) -> None:
        import shutil

        with self.lock:
            self.bytes -= sum(f.stat().st_size for f in folder.rglob("*.dcm"))
        shutil.rmtree(folder, ignore_errors=True)

    def left_running(self) -> list[Path]:
        running = self.folder / RUNNING
        return sorted(p for p in running.iterdir() if p.is_dir()) if running.exists() else []


def _server(port: int, ae_title: str, spool: _Spool, summary: ListenSummary) -> Any:
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    # every storage class in every transfer syntax: a sender never has to transcode (it may not
    # be able to, e.g. JPEG 2000) and never finds its class missing
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)

    def handle(event: Any) -> int:
        status = spool.store(event)
        if status:
            summary.refused += 1
        else:
            summary.received += 1
        return status

    try:
        return ae.start_server(("", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    except OSError as exc:
        raise UsageError(f"--port {port}: cannot listen ({exc.strerror or exc})") from exc


def listen(
    port: int,
    out: str | Path,
    *,
    ae_title: str = "MRFM",
    heads: list[str] | None = None,
    idle_seconds: float = 30.0,
    forward: str | None = None,
    spool: str | Path | None = None,
    max_spool_bytes: int = SPOOL_MAX_BYTES,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **run_options: Any,
) -> ListenSummary:
    """Receive studies on ``port`` and run each into the store ``out`` once idle ``idle_seconds``.

    ``forward`` (dimse://… or dicomweb+http(s)://…) receives each study's DICOM SEG and SR.
    Returns when SIGTERM/SIGINT arrive (or ``should_stop()`` says so) after the study in flight.
    """
    from .pipeline import run
    from .sources import public_url

    try:
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        raise UsageError("mrfm listen needs pynetdicom: pip install 'mrfm[pacs]'") from exc
    if forward:
        from .export_send import Sender

        Sender(forward, ae_title)  # a bad URL is a usage error before anything is received
    emit = on_event or (lambda e: None)
    folder = Path(spool) if spool else Path(str(out).rstrip("/")).with_name(Path(str(out).rstrip("/")).name + "-spool")
    store_spool = _Spool(folder, max_spool_bytes)
    summary = ListenSummary()
    stopping = threading.Event()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda *_: stopping.set())
    server = _server(port, ae_title, store_spool, summary)
    emit({"event": "listening", "port": port, "ae_title": ae_title, "spool": str(folder)})

    def run_study(path: Path) -> None:
        t = time.perf_counter()
        exports = ["dicom-seg", "dicom-sr"] if forward else None
        try:
            result = run(
                [path],
                out,
                heads=heads,
                exports=exports,
                export_dir=folder / ".exports" if forward else None,
                export_to=forward,
                on_event=emit,
                **run_options,
            )
        except UsageError as exc:  # e.g. nothing loadable was received: recorded, spool released
            emit({"event": "warning", "message": f"study {path.name}: {exc}"})
            store_spool.release(path)
            return
        if result.interrupted:
            stopping.set()  # the rest of this study waits in the spool for the next start
            return
        counts = {s: result.count(s) for s in ("complete", "failed", "skipped", "resumed")}
        summary.studies.append(
            {"study": path.name.rsplit("-", 1)[0], **counts, "seconds": round(time.perf_counter() - t, 3)}
        )
        emit(
            {
                "event": "study",
                "study": path.name.rsplit("-", 1)[0],
                **counts,
                "forwarded_to": public_url(forward) if forward else None,
            }
        )
        store_spool.release(path)

    try:
        for path in store_spool.left_running():
            if stopping.is_set():
                break
            run_study(path)
        while not stopping.is_set() and not (should_stop and should_stop()):
            for study in store_spool.idle(idle_seconds):
                run_study(store_spool.take(study))
                if stopping.is_set():
                    break
            stopping.wait(0.2)
    finally:
        server.shutdown()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    emit({"event": "stopped", "received": summary.received, "studies": len(summary.studies)})
    return summary


@click.command("listen")
@click.option("--port", required=True, type=click.IntRange(1, 65535), help="TCP port of the C-STORE SCP.")
@click.option("--ae-title", default="MRFM", show_default=True, help="This node's AE title.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Result store (Zarr v3 folder).")
@click.option("--heads", multiple=True, help="Heads to run (repeatable or comma-separated; default: all installed).")
@click.option(
    "--idle-seconds",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Run a study once no instance of it has arrived for this long.",
)
@click.option(
    "--forward", metavar="URL", help="Send each study's SEG and SR to dimse://AE@host:port or dicomweb+http(s)://..."
)
@click.option("--spool", type=click.Path(file_okay=False), help="Where received instances wait (default: <out>-spool).")
def listen_command(
    port: int,
    ae_title: str,
    out: str,
    heads: tuple[str, ...],
    idle_seconds: float,
    forward: str | None,
    spool: str | None,
) -> None:
    """Receive studies as a DICOM node (C-STORE SCP) and run each once idle; SIGTERM finishes and exits 0."""
    import json
    import sys

    names = [h.strip() for hs in heads for h in hs.split(",") if h.strip()] or None

    def show(event: dict[str, Any]) -> None:
        if event.get("event") in ("listening", "study", "warning", "stopped"):
            click.echo(json.dumps(event, default=str), err=True)

    try:
        listen(
            port,
            out,
            ae_title=ae_title,
            heads=names,
            idle_seconds=idle_seconds,
            forward=forward,
            spool=spool,
            on_event=show,
        )
    except SourceError:
        raise
    sys.exit(0)
