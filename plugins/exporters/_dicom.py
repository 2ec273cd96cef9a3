"""Shared DICOM helpers for the SEG and SR exporters: source headers, frame geometry, identities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

import engine
from engine import ExportContext, SkipSeries

LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS: flip x and y (its own inverse)
MANUFACTURER = "mrfm"


@dataclass
class Frame:
    """One source image plane: which instance and frame, and where its pixels lie (LPS mm)."""

    dataset: Any
    number: int | None  # 1-based frame number of a multi-frame instance, None for single-frame
    position: np.ndarray  # ImagePositionPatient: centre of pixel (row 0, column 0)
    row_dir: np.ndarray  # direction of increasing column index
    col_dir: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    rows: int
    columns: int

    def world_lps(self) -> np.ndarray:
        """(rows, columns, 3) LPS positions of every pixel centre."""
        r = np.arange(self.rows)[:, None, None] * self.spacing[0] * self.col_dir
        c = np.arange(self.columns)[None, :, None] * self.spacing[1] * self.row_dir
        return self.position + r + c


def read_headers(ctx: ExportContext, key: str) -> list[Any]:
    """The source series' datasets without pixel data, in InstanceNumber order."""
    reader = ctx.attrs(key).get("reader")
    if reader and reader not in ("dicom", engine.PACS_READER):  # a PACS series is DICOM, fetched again here
        raise SkipSeries(f"a {reader} series: DICOM exports need DICOM sources")
    ref = ctx.source(key)
    out = []
    for src in ref.sources:
        with src.open() as fh:
            out.append(pydicom.dcmread(fh, stop_before_pixels=True))
    return sorted(out, key=lambda ds: (int(ds.get("InstanceNumber") or 0), str(ds.SOPInstanceUID)))


def _item(seq_owner: Any, name: str) -> Any:
    seq = seq_owner.get(name) if seq_owner is not None else None
    return seq[0] if seq else None


def frames_of(ds: Any) -> list[Frame]:
    """Every frame of a classic (one) or enhanced multi-frame (many) instance with its geometry."""
    n = int(ds.get("NumberOfFrames") or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [
            Frame(
                ds,
                None,
                np.asarray(ds.ImagePositionPatient, float),
                np.asarray(ds.ImageOrientationPatient[:3], float),
                np.asarray(ds.ImageOrientationPatient[3:], float),
                tuple(float(v) for v in ds.PixelSpacing),
                rows,
                cols,
            )
        ]
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    frames = []
    for i, per in enumerate(ds.PerFrameFunctionalGroupsSequence[:n]):

        def pick(name: str) -> Any:
            return _item(per, name) or _item(shared, name)  # noqa: B023 (called within this iteration)

        pos, ori, meas = pick("PlanePositionSequence"), pick("PlaneOrientationSequence"), pick("PixelMeasuresSequence")
        iop = np.asarray(ori.ImageOrientationPatient, float)
        frames.append(
            Frame(
                ds,
                i + 1,
                np.asarray(pos.ImagePositionPatient, float),
                iop[:3],
                iop[3:],
                tuple(float(v) for v in meas.PixelSpacing),
                rows,
                cols,
            )
        )
    return frames


def sample_plane(volume: np.ndarray, affine: np.ndarray, frame: Frame) -> tuple[np.ndarray, float, bool]:
    """The stored-grid values at a source frame's pixel centres.

    Returns (plane (rows, columns), the largest distance in voxels from a pixel centre to the
    nearest grid point, whether every pixel fell inside the grid). The store's affine is RAS;
    DICOM positions are LPS.
    """
    ras = frame.world_lps() * LPS
    ijk = np.einsum("ab,rcb->rca", np.linalg.inv(affine)[:3, :3], ras) + np.linalg.inv(affine)[:3, 3]
    idx = np.rint(ijk).astype(np.int64)
    err = float(np.abs(ijk - idx).max()) if idx.size else 0.0
    inside = np.all((idx >= 0) & (idx < np.asarray(volume.shape[:3])), axis=-1)
    plane = np.zeros((frame.rows, frame.columns, *volume.shape[3:]), dtype=volume.dtype)
    ii = idx[inside]
    plane[inside] = volume[ii[:, 0], ii[:, 1], ii[:, 2]]
    return plane, err, bool(inside.all())


def uid(*parts: Any) -> str:
    """A UID derived from the parts, so a re-export of unchanged results gives the same UIDs."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def identity(ctx: ExportContext, key: str) -> dict[str, str]:
    """Equipment identification from the model and mrfm versions."""
    model = ctx.model(key)
    fp = str(model.get("fingerprint") or "")
    return {
        "manufacturer": MANUFACTURER,
        "model_name": str(model.get("name") or "mrfm model")[:64],
        "software_versions": f"mrfm {engine.__version__}",
        "serial": (fp.split(":")[-1][:16] or "unknown"),
        "model_fingerprint": fp,
    }
