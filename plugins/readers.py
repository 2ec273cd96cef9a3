"""Built-in series readers: DICOM (classic, Enhanced multi-frame, Siemens mosaic) and NIfTI."""

from __future__ import annotations

from typing import Callable

import engine
from engine.dicom import DicomReader
from engine.nifti import NiftiReader


@engine.hookimpl
def register_readers(register: Callable[[object], None]) -> None:
    register(DicomReader())
    register(NiftiReader())
