"""Acquisition grids: voxel-to-RAS affines for axial, sagittal, coronal, oblique and flipped scans.

Array axes follow the engine convention for DICOM-derived volumes: i runs along a row (the DICOM
row direction, first ImageOrientationPatient vector), j runs down the columns (second vector), k is
the slice index. The default in-plane axes match what scanners write for each plane; flips reverse
an axis (e.g. slices stacked head-to-foot), which DICOM allows and loaders must handle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .spatial import grid_axis_terms, rotation

ORIENTATIONS: tuple[str, ...] = ("axial", "sagittal", "coronal", "oblique")
FLIPS: tuple[str, ...] = ("row", "column", "slice")

# Columns: row direction (i), column direction (j), slice normal (k = i x j), all in RAS.
# Axial: rows run patient right->left, columns anterior->posterior (DICOM IOP 1\0\0\0\1\0).
# Sagittal: rows anterior->posterior, columns head->foot (IOP 0\1\0\0\0\-1).
# Coronal: rows right->left, columns head->foot (IOP 1\0\0\0\0\-1).
_BASE_AXES = {
    "axial": np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]]).T,
    "sagittal": np.array([[0, -1.0, 0], [0, 0, -1.0], [1.0, 0, 0]]).T,
    "coronal": np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, -1.0, 0]]).T,
}


def plane_axes(orientation: str, oblique_deg: float | Sequence[float] = 0.0, oblique_base: str = "axial") -> np.ndarray:
    """3x3 matrix whose columns are the unit row, column and slice directions in RAS.

    ``oblique`` tilts ``oblique_base`` about the world x axis and then the world y axis by
    ``oblique_deg`` (one angle for both, or a pair): a double oblique. A non-zero angle tilts the
    named planes too.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")
    base = _BASE_AXES[oblique_base if orientation == "oblique" else orientation]
    angles = np.broadcast_to(np.asarray(oblique_deg, dtype=np.float64), (2,))
    if orientation == "oblique" and not np.any(angles):
        angles = np.array([20.0, 15.0])
    return rotation("y", angles[1]) @ rotation("x", angles[0]) @ base


def make_grid(
    orientation: str,
    center_mm: Sequence[float],
    fov_mm: Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    *,
    flip: str | Iterable[str] = (),
    oblique_deg: float | Sequence[float] = 0.0,
    oblique_base: str = "axial",
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An acquisition grid centred on ``center_mm``: returns (shape, 4x4 voxel-to-RAS affine).

    Give any two of ``fov_mm``, ``shape`` and ``spacing`` (each ordered row, column, slice); the
    third follows. ``flip`` names the axes to reverse: 'row', 'column' and/or 'slice'.
    """
    shape_a, spacing_a = _resolve_extent(fov_mm, shape, spacing)
    flips = {flip} if isinstance(flip, str) else set(flip)
    flips.discard("")
    unknown = flips - set(FLIPS)
    if unknown:
        raise ValueError(f"unknown flip {sorted(unknown)}; expected some of {FLIPS}")
    axes = plane_axes(orientation, oblique_deg, oblique_base)
    signs = np.array([-1.0 if name in flips else 1.0 for name in FLIPS])
    linear = axes * signs * spacing_a
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(center_mm, dtype=np.float64) - linear @ ((np.asarray(shape_a) - 1) / 2.0)
    return shape_a, affine


def grid_points(shape: Sequence[int], affine: np.ndarray, slice_offsets: Sequence[float] = (0.0,)) -> np.ndarray:
    """World coordinates (S, I*J*K, 3) of every voxel centre, optionally shifted along k.

    ``slice_offsets`` are fractions of the slice spacing; sampling several gives a slice profile
    (partial volume across a thick slice). Points are ordered like ``np.ndarray.ravel`` of (I, J, K).
    """
    block = tuple(slice(0, int(n)) for n in shape)
    out = []
    for off in slice_offsets:
        a, b, c = grid_axis_terms(block, affine, off)
        out.append((a[:, None, None, :] + b[None, :, None, :] + c[None, None, :, :]).reshape(-1, 3))
    return np.stack(out)


def _resolve_extent(fov_mm, shape, spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    given = sum(v is not None for v in (fov_mm, shape, spacing))
    if given < 2:
        raise ValueError("give at least two of fov_mm, shape and spacing")
    if shape is None:
        spacing_a = np.asarray(spacing, dtype=np.float64)
        shape_t = tuple(max(1, int(round(f / s))) for f, s in zip(fov_mm, spacing_a, strict=True))
    else:
        shape_t = tuple(int(v) for v in shape)
        spacing_a = (
            np.asarray(spacing, dtype=np.float64)
            if spacing is not None
            else np.asarray(fov_mm, dtype=np.float64) / np.asarray(shape_t)
        )
    if len(shape_t) != 3 or spacing_a.shape != (3,):
        raise ValueError("fov_mm, shape and spacing must each have three values")
    if min(shape_t) < 1 or np.any(spacing_a <= 0):
        raise ValueError(f"grid needs positive shape and spacing, got {shape_t}, {spacing_a}")
    return shape_t, spacing_a  # type: ignore[return-value]
