"""What every hostile-input case builder shares: the corpus (its folders, UIDs, random generator
and valid series to break), the case registry and the constants the cases are built from.

``bad_inputs`` (DICOM cases), ``bad_nifti`` and ``bad_archive`` register their cases here with
:func:`case`; ``bad_inputs.write_bad_inputs`` writes them in registration order (the cases share
one random generator, so the order fixes the bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .acquisition import make_grid
from .dicom_writer import Patient, derive_uid, write_dicom_series

BAD_SHAPE = (32, 32, 8)
SPACING = (4.0, 4.0, 4.0)
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-424242"
PATIENT_BIRTH_DATE = "19700101"
PATIENT = Patient(name=PATIENT_NAME, id=PATIENT_ID, sex="F", birth_date=PATIENT_BIRTH_DATE)
BOMB_BYTES = 150 * 1024 * 1024

# Case name -> the status a hardened pipeline should give it ("skipped file" = reported in the
# run's warnings, never a series; "a or b" where either is right, as the module text says).
EXPECTED: dict[str, str] = {}
WRITERS: dict[str, Callable[[Corpus], Path]] = {}


def case(name: str, expected: str):
    def register(fn: Callable[[Corpus], Path]) -> Callable[[Corpus], Path]:
        EXPECTED[name] = expected
        WRITERS[name] = fn
        return fn

    return register


@dataclass
class Corpus:
    out_dir: Path
    seed: int
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng([self.seed, 9999])

    def folder(self, case: str) -> Path:
        path = self.out_dir / f"bad_{case}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def study_uid(self) -> str:
        return derive_uid(self.seed, "bad", "study")

    def series_uid(self, case: str) -> str:
        return derive_uid(self.seed, "bad", case)

    def volume(self, shape=BAD_SHAPE) -> np.ndarray:
        """A bright block on a noisy background: an image, not pure noise."""
        data = 300.0 + 200.0 * self.rng.random(shape)
        i, j = shape[0] // 4, shape[1] // 4
        data[i : 3 * i, j : 3 * j] += 600.0
        return data

    def series(
        self,
        case: str,
        folder: Path | None = None,
        *,
        shape=BAD_SHAPE,
        orientation="axial",
        spacing=SPACING,
        description: str | None = None,
        **kw,
    ) -> list[Path]:
        """A valid series of ``case`` (its own series UID) written into ``folder``."""
        _, affine = make_grid(orientation, (0.0, 0.0, 0.0), shape=shape, spacing=spacing)
        return write_dicom_series(
            folder or self.folder(case),
            self.volume(shape),
            affine,
            study_uid=self.study_uid(),
            series_uid=self.series_uid(case),
            description=description or f"BAD {case.upper()}",
            patient=PATIENT,
            **kw,
        )


def edit(paths: Iterable[Path], change: Callable[[Dataset], None]) -> None:
    """Rewrite DICOM files after ``change`` (no validation: the point is to break them)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)
