"""Built-in series readers: DICOM (classic, Enhanced multi-frame, Siemens mosaic) and NIfTI."""

from __future__ import annotations

from typing import Callable

import engine
from engine import DicomReader, NiftiReader


@engine.hookimpl
def register_readers(register: Callable[[object], None]) -> None:
    register(DicomReader())
    register(NiftiReader())
