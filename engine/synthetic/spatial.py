"""Small spatial helpers shared by the phantom and the acquisition grids."""

from __future__ import annotations

import numpy as np


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about world axis 'x', 'y' or 'z' (right-handed)."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"unknown rotation axis {axis!r}")


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (QR of a Gaussian matrix with sign fix)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def grid_axis_terms(block: tuple[slice, ...], affine: np.ndarray, slice_offset: float = 0.0) -> list[np.ndarray]:
    """Three (n_axis, 3) arrays whose broadcast sum is the world position of each block voxel."""
    affine = np.asarray(affine, dtype=np.float64)
    terms = []
    for axis, sl in enumerate(block):
        idx = np.arange(sl.start, sl.stop, dtype=np.float64) + (slice_offset if axis == 2 else 0.0)
        terms.append(idx[:, None] * affine[:3, axis][None, :])
    terms[0] = terms[0] + affine[:3, 3]
    return terms
