"""Hostile-input corpus, NIfTI cases: NaN, singular and zero-pixdim affines, 2-D and 5-D images, a
truncated ``.nii.gz`` and NaN voxels, written byte by byte so nibabel cannot repair them.

The builders register with ``bad_inputs`` (which imports this module); its docstring lists the
expected outcomes and ``write_bad_inputs`` writes them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from .acquisition import make_grid
from .bad_corpus import BAD_SHAPE, SPACING, case, Corpus


# ---- helpers ------------------------------------------------------------------------------------


def _nifti_header(case: str, shape: tuple[int, ...], dtype=np.float32) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["descrip"] = f"BAD {case.upper()}".encode()
    hdr.set_xyzt_units("mm")
    return hdr


def _write_raw_nifti(path: Path, hdr: nib.Nifti1Header, data: np.ndarray) -> Path:
    """Single-file NIfTI-1 written byte by byte, so nibabel cannot repair what must stay broken."""
    hdr["vox_offset"] = 352
    hdr["magic"] = b"n+1"
    raw = hdr.binaryblock + b"\0" * 4 + np.asarray(data, dtype=hdr.get_data_dtype()).tobytes(order="F")
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    path.write_bytes(raw)
    return path


def _sform_nifti(
    corpus: Corpus, case: str, shape: tuple[int, ...], affine: np.ndarray, data: np.ndarray | None = None
) -> Path:
    hdr = _nifti_header(case, shape)
    hdr.set_sform(affine, code="scanner")
    hdr.set_qform(None, code="unknown")
    data = corpus.volume(shape).astype(np.float32) if data is None else data
    return _write_raw_nifti(corpus.folder(case) / f"bad_{case}.nii", hdr, data).parent


def _grid_affine() -> np.ndarray:
    return make_grid("axial", (0.0, 0.0, 0.0), shape=BAD_SHAPE, spacing=SPACING)[1]


# ---- NIfTI --------------------------------------------------------------------------------------


@case("nifti_nan_affine", "failed")
def _nifti_nan_affine(c: Corpus) -> Path:
    hdr = _nifti_header("nifti_nan_affine", BAD_SHAPE)
    hdr["sform_code"], hdr["qform_code"] = 1, 1
    for name in ("srow_x", "srow_y", "srow_z"):
        hdr[name] = np.nan
    for name in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
        hdr[name] = np.nan
    path = c.folder("nifti_nan_affine") / "bad_nifti_nan_affine.nii"
    return _write_raw_nifti(path, hdr, c.volume().astype(np.float32)).parent


@case("nifti_singular_affine", "failed")
def _nifti_singular_affine(c: Corpus) -> Path:
    affine = _grid_affine()
    affine[:3, 2] = 0.0
    return _sform_nifti(c, "nifti_singular_affine", BAD_SHAPE, affine)


@case("nifti_zero_pixdim", "failed")
def _nifti_zero_pixdim(c: Corpus) -> Path:
    hdr = _nifti_header("nifti_zero_pixdim", BAD_SHAPE)
    hdr["qform_code"], hdr["sform_code"] = 1, 0
    hdr["quatern_b"] = hdr["quatern_c"] = hdr["quatern_d"] = 0.0
    hdr["pixdim"][1:4] = 0.0
    path = c.folder("nifti_zero_pixdim") / "bad_nifti_zero_pixdim.nii"
    return _write_raw_nifti(path, hdr, c.volume().astype(np.float32)).parent


@case("nifti_2d", "complete")
def _nifti_2d(c: Corpus) -> Path:
    return _sform_nifti(c, "nifti_2d", BAD_SHAPE[:2], _grid_affine())


@case("nifti_5d", "failed")
def _nifti_5d(c: Corpus) -> Path:
    shape = (*BAD_SHAPE, 1, 3)
    return _sform_nifti(c, "nifti_5d", shape, _grid_affine(), c.volume(shape).astype(np.float32))


@case("nifti_gz_truncated", "failed or skipped file")
def _nifti_gz_truncated(c: Corpus) -> Path:
    hdr = _nifti_header("nifti_gz_truncated", BAD_SHAPE)
    hdr.set_sform(_grid_affine(), code="scanner")
    path = _write_raw_nifti(
        c.folder("nifti_gz_truncated") / "bad_nifti_gz_truncated.nii.gz", hdr, c.volume().astype(np.float32)
    )
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path.parent


@case("nifti_nan_voxels", "complete or failed")
def _nifti_nan_voxels(c: Corpus) -> Path:
    data = c.volume().astype(np.float32)
    data[4:12, 4:12, 2:5] = np.nan
    return _sform_nifti(c, "nifti_nan_voxels", BAD_SHAPE, _grid_affine(), data)
