"""Slice-stack geometry: order frames along the normal, check the stack, build the affine.

The same checks run at scan time (problems are reported) and at load time (they raise).

Rules, with their tolerances and why:

- ImageOrientationPatient: each direction vector must have unit length within
  ``UNIT_LENGTH_TOL`` (1 %); within it the vectors are renormalised (a note is recorded when
  they were off by more than ``UNIT_NOTE_TOL``, i.e. more than decimal rounding explains).
  Beyond it the header is corrupt. Row and column vectors must be orthogonal within
  ``ORTHOGONAL_TOL`` (|cos| <= 0.01, about 0.57 degrees): rounding gives < 1e-4, and beyond
  it their cross product is no trustworthy slice normal.
- PixelSpacing, positions and orientations must be finite; spacings positive.
- Slice positions must lie on a regular grid: a least-squares fit of the 3D positions against
  slice indices (``position_k ~ p0 + m_k * v``, with m_k counting whole steps, so a gap of two
  steps is a missing slice) must leave every slice within ``GRID_TOL`` (10 %) of the step.
  Real series jitter by 1-2 % of the step (GE obliques: 6.96-7.07 mm for 7 mm), which
  dcm2niix, ITK and nibabel accept; a tenth of a slice is well below the slice's own partial
  volume, while a displacement of a fifth of a slice or more visibly distorts anatomy measured
  across slices. The affine is the fit itself (origin = fitted p0, slice vector = fitted v), so
  slice centres stay within the jitter of their ImagePositionPatient instead of accumulating the
  error of the first and last slice. The largest residual (mm) and the rule go to ``notes``.
- Slices whose fit fails are variable spacing: they are resampled along the normal onto a
  regular grid of the smallest step (the finest resolution acquired; not finer than half the
  median step, so one odd near-duplicate cannot blow the grid up), by linear interpolation
  between the neighbouring slices.
- Positions must move along the normal: a slice vector tilted more than ``SHEAR_TOL_DEG``
  (0.5 degrees) from it is a sheared stack (gantry tilt) and is refused; rounding of positions
  gives hundredths of a degree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import StackError
from ..geometry import LPS_TO_RAS
from .frames import ORIENTATION_TOL, POSITION_TOL_MM, Frame

UNIT_LENGTH_TOL = 0.01
UNIT_NOTE_TOL = 1e-4
ORTHOGONAL_TOL = 0.01
GRID_TOL = 0.10
SHEAR_TOL_DEG = 0.5


@dataclass
class Stack:
    """A checked slice stack: one volume's frames ordered along the slice normal.

    ``resample`` is None for a regular grid; otherwise one ``(k0, k1, w)`` per output slice:
    the slice is ``(1 - w) * frames[k0] + w * frames[k1]``.
    """

    frames: list[Frame]
    affine: np.ndarray  # voxel (i, j, k) -> RAS mm
    n_volumes: int
    resample: list[tuple[int, int, float]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return len(self.resample) if self.resample is not None else len(self.frames)


# --------------------------------------------------------------------------- stack geometry


def frame_names(frames: list[Frame], limit: int = 3) -> str:
    names = sorted({str(f.source) for f in frames})
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_stack(frames: list[Frame]) -> Stack:
    """Order frames along the slice normal, check the grid, and build the voxel->RAS affine.

    Raises :class:`StackError` with a reason naming the files for: missing or non-finite
    geometry, bad orientation vectors or spacing, mixed dimensions or orientations, duplicate
    positions, missing slices and sheared stacks (see the module docstring).
    """
    if not frames:
        raise StackError("no image frames")
    _check_dimensions(frames)
    _check_values(frames)
    row_cos, col_cos, notes = _orientation(frames)
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    volume, n_volumes = _first_volume(_positions(frames, normal))

    lps = np.eye(4)
    row_sp, col_sp = volume[0].pixel_spacing  # type: ignore[misc]
    lps[:3, 0] = row_cos * col_sp  # i runs along a row (across columns)
    lps[:3, 1] = col_cos * row_sp  # j runs down a column (across rows)
    pos = np.array([f.ipp for f in volume], dtype=float)
    origin, slice_vec, resample = _slice_axis(volume, pos, normal, notes)
    lps[:3, 2], lps[:3, 3] = slice_vec, origin
    return Stack(volume, LPS_TO_RAS @ lps, n_volumes, resample, notes)


def _check_dimensions(frames: list[Frame]) -> None:
    shapes: dict[tuple[int, int], list[Frame]] = defaultdict(list)
    for f in frames:
        shapes[(f.rows, f.cols)].append(f)
    if len(shapes) > 1:
        parts = "; ".join(f"{r}x{c} in {frame_names(fs)}" for (r, c), fs in sorted(shapes.items()))
        raise StackError(f"mixed image dimensions (rows x columns) within the series: {parts}")
    ((rows, cols),) = shapes
    if rows < 1 or cols < 1:
        raise StackError(f"image dimensions {rows} x {cols} (Rows x Columns) in {frame_names(frames)}")


def _check_values(frames: list[Frame]) -> None:
    missing = [f for f in frames if f.iop is None or f.ipp is None or f.pixel_spacing is None]
    if missing:
        raise StackError(f"no ImageOrientationPatient/ImagePositionPatient/PixelSpacing in {frame_names(missing)}")
    for tag, get in (("ImageOrientationPatient", lambda f: f.iop), ("ImagePositionPatient", lambda f: f.ipp)):
        bad = [f for f in frames if not np.isfinite(get(f)).all()]
        if bad:
            raise StackError(f"{tag} holds non-finite values (NaN or Inf) in {frame_names(bad)}")
    bad = [f for f in frames if not (np.isfinite(f.pixel_spacing).all() and min(f.pixel_spacing) > 0)]  # type: ignore[arg-type]
    if bad:
        raise StackError(
            f"PixelSpacing {list(bad[0].pixel_spacing)} is not two positive numbers in {frame_names(bad)}"  # type: ignore[arg-type]
        )
    spacings = np.array([f.pixel_spacing for f in frames], dtype=float)
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise StackError(f"mixed PixelSpacing within the series: {frame_names(frames)}")


def _orientation(frames: list[Frame]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Unit row and column direction cosines, checked (see the module docstring)."""
    iops = np.array([f.iop for f in frames], dtype=float)
    off = np.abs(iops - iops[0]).max(axis=1) > ORIENTATION_TOL
    if off.any():
        odd = [f for f, o in zip(frames, off) if o]
        raise StackError(
            f"mixed slice orientations (ImageOrientationPatient differs) in {frame_names(odd)} "
            f"versus {frames[0].source}"
        )
    row, col = iops[0, :3], iops[0, 3:]
    lengths = np.array([np.linalg.norm(row), np.linalg.norm(col)])
    for name, length in zip(("row", "column"), lengths):
        if abs(length - 1.0) > UNIT_LENGTH_TOL:
            raise StackError(
                f"ImageOrientationPatient {name} vector has length {length:.4f}, not 1 "
                f"(tolerance {UNIT_LENGTH_TOL:g}) in {frame_names(frames)}"
            )
    row, col = row / lengths[0], col / lengths[1]
    cos = float(np.dot(row, col))
    if abs(cos) > ORTHOGONAL_TOL:
        angle = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
        raise StackError(
            f"ImageOrientationPatient row and column vectors are not orthogonal (angle {angle:.2f}°, "
            f"allowed 90 ± {np.degrees(np.arcsin(ORTHOGONAL_TOL)):.2f}°) in {frame_names(frames)}"
        )
    notes: dict[str, Any] = {}
    if np.abs(lengths - 1.0).max() > UNIT_NOTE_TOL:
        notes["orientation_rule"] = (
            f"ImageOrientationPatient renormalised to unit length (row {lengths[0]:.4f}, column {lengths[1]:.4f})"
        )
    return row, col, notes


def _positions(frames: list[Frame], normal: np.ndarray) -> list[list[Frame]]:
    """Frames grouped by slice position along the normal, in ascending order."""
    proj = np.array([np.dot(f.ipp, normal) for f in frames])  # type: ignore[arg-type]
    positions: list[list[Frame]] = []
    last = None
    for idx in np.argsort(proj, kind="stable"):
        if last is None or proj[idx] - last > POSITION_TOL_MM:
            positions.append([])
            last = proj[idx]
        positions[-1].append(frames[idx])
    return positions


def _first_volume(positions: list[list[Frame]]) -> tuple[list[Frame], int]:
    """Pick one frame per slice position (see the package docstring for the rule)."""
    counts = set()
    chosen = []
    for group in positions:
        by_key: dict[tuple, list[Frame]] = defaultdict(list)
        for f in group:
            by_key[f.order].append(f)
        dupes = [fs for fs in by_key.values() if len(fs) > 1]
        if dupes:
            raise StackError(
                f"duplicate slice position ({len(dupes[0])} images at one location): {frame_names(dupes[0])}"
            )
        counts.add(len(by_key))
        chosen.append(min(group, key=lambda f: (f.order, f.tiebreak)))
    if len(counts) > 1:
        raise StackError(
            f"incomplete volumes: slice positions hold {sorted(counts)} images each "
            f"(a duplicate or missing image) in {frame_names([f for g in positions for f in g])}"
        )
    return chosen, counts.pop()


# --------------------------------------------------------------------------- the slice axis


def _slice_axis(
    volume: list[Frame], pos: np.ndarray, normal: np.ndarray, notes: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, float]] | None]:
    """Origin and slice vector (LPS) of the grid, and a resampling plan when spacing varies."""
    if len(volume) == 1:
        step = volume[0].slice_step
        notes["slice_rule"] = (
            f"one slice: slice axis {step:g} mm from SpacingBetweenSlices/SliceThickness"
            if step
            else "one slice: no SpacingBetweenSlices/SliceThickness, slice axis 1 mm"
        )
        return pos[0], normal * (step or 1.0), None
    s = pos @ normal
    steps = np.diff(s)
    index = _grid_index(steps)
    if index is not None:
        origin, vec, residual = _fit_line(index, pos)
        step = float(vec @ normal)
        if residual <= GRID_TOL * step:
            _check_missing(volume, s, index, step)
            _check_shear(volume, vec, normal)
            notes["slice_rule"] = (
                f"regular grid: least-squares fit of slice positions, every slice within "
                f"{GRID_TOL:.0%} of the {step:.4f} mm step"
            )
            notes["slice_fit_max_residual_mm"] = round(residual, 4)
            return origin, vec, None
    return _variable_spacing(volume, pos, s, normal, notes)


def _grid_index(steps: np.ndarray) -> np.ndarray | None:
    """Slice indices in whole median steps (a gap of two steps skips an index), or None when a
    step is less than half the median (no regular grid holds it)."""
    median = float(np.median(steps))
    increments = np.rint(steps / median)
    if (increments < 1).any():
        return None
    return np.concatenate([[0.0], np.cumsum(increments)])


def _fit_line(index: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares ``pos ~ origin + index * vec``; returns origin, vec and the largest 3D
    distance of a slice from its fitted position."""
    design = np.column_stack([np.ones_like(index), index])
    coef, *_ = np.linalg.lstsq(design, pos, rcond=None)
    residual = float(np.linalg.norm(pos - design @ coef, axis=1).max())
    return coef[0], coef[1], residual


def _check_missing(volume: list[Frame], s: np.ndarray, index: np.ndarray, step: float) -> None:
    gaps = np.flatnonzero(np.diff(index) > 1)
    if not gaps.size:
        return
    parts = [
        f"{int(index[b + 1] - index[b]) - 1} missing between {volume[b].source} ({s[b]:.2f} mm) and "
        f"{volume[b + 1].source} ({s[b + 1]:.2f} mm)"
        for b in gaps[:3]
    ]
    raise StackError(f"missing slice(s), expected step {step:.3f} mm: " + "; ".join(parts))


def _check_shear(volume: list[Frame], vec: np.ndarray, normal: np.ndarray) -> None:
    along = float(vec @ normal)
    drift = float(np.linalg.norm(vec - along * normal))
    tilt = float(np.degrees(np.arctan2(drift, along)))
    if tilt > SHEAR_TOL_DEG:
        raise StackError(
            f"sheared slice stack: ImagePositionPatient moves {drift:.3f} mm in-plane per slice "
            f"(tilted {tilt:.2f}° from the slice normal, as from a gantry tilt; at most "
            f"{SHEAR_TOL_DEG:g}° is accepted) in {frame_names(volume)}"
        )


def _variable_spacing(
    volume: list[Frame], pos: np.ndarray, s: np.ndarray, normal: np.ndarray, notes: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, float]]]:
    """Resample along the normal onto a regular grid (see the module docstring)."""
    steps = np.diff(s)
    step = max(float(steps.min()), float(np.median(steps)) / 2.0)
    rel = s - s[0]
    # in-plane drift per mm along the normal, least squares through the first slice
    inplane = (pos - pos[0]) - np.outer(rel, normal)
    drift = inplane.T @ rel / float(rel @ rel)
    _check_shear(volume, normal + drift, normal)
    n_out = int(np.floor(rel[-1] / step + 1e-6)) + 1
    plan = []
    for t in np.arange(n_out) * step:
        k = int(np.clip(np.searchsorted(rel, t, side="right") - 1, 0, len(rel) - 2))
        w = float(np.clip((t - rel[k]) / (rel[k + 1] - rel[k]), 0.0, 1.0))
        plan.append((k, k + 1, w))
    notes["slice_rule"] = (
        f"resampled along the slice normal from variable spacing (steps {steps.min():.3f}–"
        f"{steps.max():.3f} mm) onto {n_out} slices of {step:.3f} mm"
    )
    return pos[0], step * (normal + drift), plan
