"""Built-in archive sources (registered by default): folders and zip files, DICOMweb, DIMSE.

The PACS sources need the ``pacs`` extra (dicomweb-client, pynetdicom); without it they are not
registered, and a PACS URL is a usage error that names the extra.
"""

from __future__ import annotations

from typing import Callable

import engine

from .folder import FolderSource


@engine.hookimpl
def register_sources(register: Callable[[object], None]) -> None:
    register(FolderSource())
    try:
        from .dicomweb import DicomwebSource
        from .dimse import DimseSource
    except ImportError:  # a slim install reads folders only
        return
    register(DicomwebSource())
    register(DimseSource())


@engine.hookimpl
def register_readers(register: Callable[[object], None]) -> None:
    # loads a PACS series: fetch into a bounded spool, read as DICOM, release
    register(engine.PacsReader())
