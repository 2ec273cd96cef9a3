"""A tiny archive for tests and examples that need a real series but no anatomy: noise volumes
of 24 x 24 x 6 voxels at 4 mm, one study."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .acquisition import make_grid
from .dicom_writer import derive_uid, write_dicom_series


def write_small_archive(folder: Path, *, seed: int, name: str, series: int = 1) -> Path:
    """``series`` axial series of one study under ``folder`` (``s`` for one; ``s0``, ``s1``, ...
    stacked 10 mm apart for more), UIDs derived from ``seed`` and ``name``; returns ``folder``."""
    for n in range(series):
        _, affine = make_grid("axial", (0.0, 0.0, 10.0 * n), shape=(24, 24, 6), spacing=(4.0, 4.0, 4.0))
        data = 300.0 + 400.0 * np.random.default_rng(seed if series == 1 else n).random((24, 24, 6))
        write_dicom_series(
            folder / ("s" if series == 1 else f"s{n}"),
            data,
            affine,
            study_uid=derive_uid(seed, name, "study"),
            series_uid=derive_uid(seed, name, "series" if series == 1 else n),
            description="T1" if series == 1 else f"T1 {n}",
        )
    return folder
