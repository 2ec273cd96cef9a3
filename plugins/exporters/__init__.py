"""Built-in exporters (registered by default): DICOM SEG and SR, NIfTI, OME-Zarr and tables."""

from __future__ import annotations

from typing import Callable

import engine

from .dicom_seg import DicomSegExporter
from .dicom_sr import DicomSrExporter
from .nifti import NiftiExporter
from .ome_zarr import OmeZarrExporter
from .table import TableExporter


@engine.hookimpl
def register_exporters(register: Callable[[object], None]) -> None:
    for exporter in (DicomSegExporter(), DicomSrExporter(), NiftiExporter(), OmeZarrExporter(), TableExporter()):
        register(exporter)
