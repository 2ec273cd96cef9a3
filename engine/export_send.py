"""Sending exported DICOM (SEG, SR) to a PACS: ``--to dicomweb+http(s)://…`` (STOW-RS) or
``--to dimse://AE@host:port`` (C-STORE), through the source plugin that claims the URL.

The export manifest records, per series and destination, which files were sent; a file is sent
at most once (the record is written after each file), and a rerun sends only what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SourceError, UsageError
from .sources import is_url, public_url, source_for


class Sender:
    """Sends files to one PACS URL; built once per export, checked before anything is written."""

    def __init__(self, url: str, ae_title: str = "MRFM") -> None:
        if not is_url(url):
            raise UsageError(f"--to {url}: expected dicomweb+http(s)://HOST:PORT/ROOT or dimse://AE@HOST:PORT")
        self.url, self.ae_title = url, ae_title
        self.source = source_for(url)
        if not hasattr(self.source, "send"):
            raise UsageError(f"--to {public_url(url)}: the {self.source.name} source cannot send")
        self.label = public_url(url)

    def send(self, path: Path) -> None:
        """Send one DICOM file; raises SourceError with one line saying why it was not stored."""
        try:
            self.source.send(self.url, [path], self.ae_title)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(
                f"{self.label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            ) from exc


def send_pending(sender: Sender, record: dict[str, Any], out_dir: Path, save: Any) -> tuple[int, str | None]:
    """Send the record's files not yet sent to ``sender``'s URL; ``save()`` persists the record
    after each file. Returns (files sent now, the first failure's reason or None)."""
    sent: list[str] = record.setdefault("sent", {}).setdefault(sender.label, [])
    n = 0
    for name in record.get("files", []):
        if name in sent or not name.endswith(".dcm"):
            continue
        try:
            sender.send(out_dir / name)
        except SourceError as exc:
            return n, f"sending {name} failed: {exc}"
        sent.append(name)
        n += 1
        save()
    return n, None
