"""Slice-stack geometry: order frames along the normal, check the stack, build the affine.

The same checks run at scan time (problems are reported) and at load time (they raise).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..errors import GeometryError
from ..geometry import LPS_TO_RAS
from .frames import ORIENTATION_TOL, POSITION_TOL_MM, SPACING_REL_TOL, Frame

@dataclass
class Stack:
    """A checked slice stack: one volume's frames ordered along the slice normal."""

    frames: list[Frame]
    affine: np.ndarray  # voxel (i, j, k) -> RAS mm
    n_volumes: int


class StackError(GeometryError, ValueError):
    """The frames of a series do not form one regular 3D grid."""



# --------------------------------------------------------------------------- stack geometry


def frame_names(frames: list[Frame], limit: int = 3) -> str:
    names = sorted({str(f.source) for f in frames})
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_stack(frames: list[Frame]) -> Stack:
    """Order frames along the slice normal, check the grid, and build the voxel->RAS affine.

    Raises :class:`StackError` with a reason naming the files for: missing geometry, mixed
    dimensions or orientations, duplicate positions, missing slices, non-uniform spacing.
    """
    if not frames:
        raise StackError("no image frames")
    shapes: dict[tuple[int, int], list[Frame]] = defaultdict(list)
    for f in frames:
        shapes[(f.rows, f.cols)].append(f)
    if len(shapes) > 1:
        parts = "; ".join(f"{r}x{c} in {frame_names(fs)}" for (r, c), fs in sorted(shapes.items()))
        raise StackError(f"mixed image dimensions (rows x columns) within the series: {parts}")
    missing = [f for f in frames if f.iop is None or f.ipp is None or f.pixel_spacing is None]
    if missing:
        raise StackError(
            f"no ImageOrientationPatient/ImagePositionPatient/PixelSpacing in {frame_names(missing)}"
        )
    iops = np.array([f.iop for f in frames], dtype=float)
    off = np.abs(iops - iops[0]).max(axis=1) > ORIENTATION_TOL
    if off.any():
        odd = [f for f, o in zip(frames, off) if o]
        raise StackError(
            f"mixed slice orientations (ImageOrientationPatient differs) in {frame_names(odd)} "
            f"versus {frames[0].source}"
        )
    spacings = np.array([f.pixel_spacing for f in frames], dtype=float)
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise StackError(f"mixed PixelSpacing within the series: {frame_names(frames)}")

    row_cos, col_cos = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    proj = np.array([np.dot(f.ipp, normal) for f in frames])  # type: ignore[arg-type]
    order = np.argsort(proj, kind="stable")

    positions: list[list[Frame]] = []
    last = None
    for idx in order:
        if last is None or proj[idx] - last > POSITION_TOL_MM:
            positions.append([])
            last = proj[idx]
        positions[-1].append(frames[idx])

    volume, n_volumes = _first_volume(positions)
    pos = np.array([np.dot(f.ipp, normal) for f in volume])  # type: ignore[arg-type]
    _check_spacing(volume, pos)

    lps = np.eye(4)
    row_sp, col_sp = volume[0].pixel_spacing  # type: ignore[misc]
    lps[:3, 0] = row_cos * col_sp  # i runs along a row (across columns)
    lps[:3, 1] = col_cos * row_sp  # j runs down a column (across rows)
    first = np.array(volume[0].ipp, dtype=float)
    if len(volume) > 1:
        lps[:3, 2] = (np.array(volume[-1].ipp, dtype=float) - first) / (len(volume) - 1)
    else:
        lps[:3, 2] = normal * (volume[0].slice_step or 1.0)
    lps[:3, 3] = first
    return Stack(frames=volume, affine=LPS_TO_RAS @ lps, n_volumes=n_volumes)


def _first_volume(positions: list[list[Frame]]) -> tuple[list[Frame], int]:
    """Pick one frame per slice position (see the module docstring for the rule)."""
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


def _check_spacing(volume: list[Frame], pos: np.ndarray) -> None:
    if len(volume) < 3:
        return
    steps = np.diff(pos)
    median = float(np.median(steps))
    tol = max(POSITION_TOL_MM, SPACING_REL_TOL * median)
    bad = np.flatnonzero(np.abs(steps - median) > tol)
    if not bad.size:
        return
    gaps = []
    for b in bad:
        ratio = steps[b] / median
        k = round(ratio)
        if k >= 2 and abs(steps[b] - k * median) <= tol * k:
            gaps.append(
                f"{k - 1} missing between {volume[b].source} ({pos[b]:.2f} mm) and "
                f"{volume[b + 1].source} ({pos[b + 1]:.2f} mm)"
            )
        else:
            gaps = []
            break
    if gaps:
        raise StackError(f"missing slice(s), expected step {median:.3f} mm: " + "; ".join(gaps[:3]))
    b = int(bad[0])
    raise StackError(
        f"non-uniform slice spacing: step {steps[b]:.3f} mm between {volume[b].source} and "
        f"{volume[b + 1].source}, median step {median:.3f} mm"
    )


