"""One geometry convention for the whole engine.

A :class:`Volume` holds ``data`` with shape (I, J, K) and a 4x4 ``affine`` that maps voxel
indices (i, j, k, 1) to RAS+ millimetres, exactly nibabel's convention. DICOM's LPS patient
coordinates are converted once, at load time, with :data:`LPS_TO_RAS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GeometryError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The voxel axes must span at least this fraction of the volume of a box with the same edge
# lengths (|det| / product of the voxel sizes); below it they are within ~0.06 degrees of lying
# in one plane, the inverse is numerically meaningless and orientation cannot be named.
MIN_AXIS_VOLUME = 1e-3
VOXEL_SIZE_MM = (1e-6, 1e5)  # a voxel edge outside this range is a broken header, not a scan


@dataclass
class Volume:
    """A 3D image on a voxel grid with a voxel-to-RAS affine."""

    data: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.data.ndim != 3:
            raise ValueError(f"Volume data must be 3D, got shape {self.data.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {self.affine.shape}")
        check_affine(self.affine, str(self.meta.get("series_key", "volume")))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing(self.affine)

    @property
    def orientation(self) -> str:
        return orientation_name(self.affine)

    def world_bounds(self) -> np.ndarray:
        """See :func:`world_bounds`."""
        return world_bounds(self.shape, self.affine)


def affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` is not a usable voxel-to-world map (finite, invertible), or None."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        return f"affine has shape {affine.shape}, not 4x4"
    if not np.isfinite(affine).all():
        return "affine holds non-finite values (NaN or Inf)"
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        return f"affine's last row is {affine[3].tolist()}, not [0, 0, 0, 1]"
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    lo, hi = VOXEL_SIZE_MM
    for axis, size in enumerate(sizes):
        if not lo <= size <= hi:
            return f"voxel size along axis {axis} is {size:.3g} mm (allowed {lo:g} to {hi:g} mm)"
    volume = abs(float(np.linalg.det(affine[:3, :3]))) / float(np.prod(sizes))
    if volume < MIN_AXIS_VOLUME:
        return (
            f"affine is singular: its voxel axes are (nearly) coplanar, |det| / voxel-size product "
            f"= {volume:.2g} < {MIN_AXIS_VOLUME:g}"
        )
    return None


def check_affine(affine: np.ndarray, where: str) -> None:
    """Raise :class:`GeometryError` naming ``where`` and the rule when the affine is unusable."""
    problem = affine_problem(affine)
    if problem:
        raise GeometryError(f"{where}: {problem}")


def spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) points through a 4x4 affine."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def world_to_voxel(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) RAS mm points to continuous voxel indices."""
    return apply_affine(np.linalg.inv(affine), points)


def corners(shape: tuple[int, ...]) -> np.ndarray:
    """The 8 corner voxel centres of a grid, shape (8, 3)."""
    hi = np.asarray(shape[:3], dtype=np.float64) - 1
    return np.array([[a, b, c] for a in (0, hi[0]) for b in (0, hi[1]) for c in (0, hi[2])])


def world_bounds(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The grid's world bounds, the one convention for a field of view: the axis-aligned RAS box
    (x0, y0, z0, x1, y1, z1) around its voxels including their half-voxel extent. Stored boxes
    are clipped to it and views are centred in it."""
    pts = apply_affine(affine, corners(tuple(s + 1 for s in shape[:3])) - 0.5)
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)])


def voxel_centre_bounds(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The axis-aligned RAS box around the outermost voxel centres (half a voxel inside
    :func:`world_bounds` on every side)."""
    pts = apply_affine(affine, corners(shape))
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)])


def slice_normal(affine: np.ndarray) -> np.ndarray:
    """Unit vector of the third array axis in world space."""
    n = np.asarray(affine)[:3, 2]
    return n / np.linalg.norm(n)


def orientation_name(affine: np.ndarray, oblique_tolerance_deg: float = 10.0) -> str:
    """Name the acquisition plane from the slice direction: axial, sagittal, coronal or oblique.

    The slice direction is the third array axis; an axis more than ``oblique_tolerance_deg``
    away from every world axis is called oblique.
    """
    n = np.abs(slice_normal(affine))
    axis = int(np.argmax(n))
    angle = np.degrees(np.arccos(np.clip(n[axis], -1.0, 1.0)))
    in_plane = np.asarray(affine)[:3, :2] / np.linalg.norm(np.asarray(affine)[:3, :2], axis=0)
    in_plane_tilt = np.degrees(np.arccos(np.clip(np.abs(in_plane).max(axis=0).min(), -1.0, 1.0)))
    if angle > oblique_tolerance_deg or in_plane_tilt > oblique_tolerance_deg:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def axis_codes(affine: np.ndarray) -> str:
    """nibabel's closest axis codes, e.g. 'RAS' or 'LPI'."""
    import nibabel as nib  # heavy: only this conversion needs it; geometry stays numpy-only

    return "".join(nib.aff2axcodes(affine))
