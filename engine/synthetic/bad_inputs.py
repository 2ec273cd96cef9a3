"""Small, deliberately broken inputs that a robust pipeline must report rather than crash on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .acquisition import make_grid
from .dicom_writer import Patient, derive_uid, write_dicom_series

BAD_SHAPE = (32, 32, 8)


def write_bad_inputs(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write one folder per bad case under ``out_dir``; returns case name -> folder.

    - ``not_dicom``: a text file named like a DICOM file.
    - ``truncated``: an 8-slice MR series whose last file is cut off inside its pixel data.
    - ``missing_slice``: an 8-slice MR series with the 4th slice removed (a gap in positions).
    - ``mixed_size``: one MR series whose slices have two different Columns values.
    - ``ct``: a complete CT series (Modality CT), not MR.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, 9999])
    cases: dict[str, Path] = {}

    not_dicom = out_dir / "bad_not_dicom"
    not_dicom.mkdir(parents=True, exist_ok=True)
    (not_dicom / "IM0001.dcm").write_text("This is a scanner log, not a DICOM file.\n")
    cases["not_dicom"] = not_dicom

    def series(case: str, shape=BAD_SHAPE, **kw) -> list[Path]:
        _, affine = make_grid("axial", (0.0, 0.0, 0.0), shape=shape, spacing=(4.0, 4.0, 4.0))
        data = 300.0 + 500.0 * rng.random(shape)
        patient = Patient(name=f"BAD^{case.upper()}", id=f"BAD{seed:04d}")
        return write_dicom_series(
            out_dir / f"bad_{case}",
            data,
            affine,
            study_uid=derive_uid(seed, "bad", "study"),
            series_uid=derive_uid(seed, "bad", case),
            description=f"BAD {case.upper()}",
            patient=patient,
            **kw,
        )

    paths = series("truncated")
    raw = paths[-1].read_bytes()
    paths[-1].write_bytes(raw[: len(raw) - BAD_SHAPE[0] * BAD_SHAPE[1]])  # lose half the pixels
    cases["truncated"] = paths[-1].parent

    paths = series("missing_slice")
    paths[3].unlink()
    cases["missing_slice"] = paths[0].parent

    # Same series UID, two matrix sizes: slices 5-8 are rewritten 40 columns wide.
    paths = series("mixed_size")
    wide = series("mixed_size", shape=(40, 32, 8), file_names="IMW{:04d}.dcm")
    for k in range(4):
        wide[k].unlink()
        paths[4 + k].unlink()
    cases["mixed_size"] = paths[0].parent

    paths = series("ct", modality="CT", rescale=(1.0, -1024.0))
    cases["ct"] = paths[0].parent
    return cases
