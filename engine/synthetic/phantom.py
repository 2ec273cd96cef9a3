"""Analytic anatomy in world (RAS+ mm) coordinates.

A :class:`Phantom` is an ordered list of solid :class:`Structure` primitives (later ones paint over
earlier ones) plus :class:`Lesion` ellipsoids painted last. Because everything is defined in world
millimetres, any acquisition grid sampling it sees the same anatomy at the same place, which is what
makes the archive a geometry test as well as a demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..vocabulary import CONTRASTS, LABEL_NAMES, REGIONS
from .spatial import grid_axis_terms

__all__ = ["CONTRASTS", "LABEL_NAMES", "REGIONS", "Lesion", "Phantom", "Structure", "block_points"]


# Relative signal per tissue and contrast (arbitrary units, background 0). The ordering follows
# spin-echo physics: fluid dark on T1 and FLAIR and bright on T2, fat bright on T1, lesions
# bright on T2/FLAIR.
TISSUE_SIGNAL: dict[str, dict[str, float]] = {
    "fat": dict(T1=900, T2=600, FLAIR=550, PD=850),
    "soft": dict(T1=450, T2=300, FLAIR=300, PD=500),
    "muscle": dict(T1=350, T2=200, FLAIR=220, PD=400),
    "brain": dict(T1=520, T2=380, FLAIR=420, PD=600),
    "marrow": dict(T1=750, T2=450, FLAIR=400, PD=700),
    "cord": dict(T1=420, T2=350, FLAIR=380, PD=550),
    "disc": dict(T1=300, T2=650, FLAIR=400, PD=600),
    "liver": dict(T1=480, T2=220, FLAIR=280, PD=500),
    "spleen": dict(T1=380, T2=400, FLAIR=350, PD=560),
    "kidney": dict(T1=400, T2=500, FLAIR=380, PD=600),
    "csf": dict(T1=80, T2=950, FLAIR=50, PD=750),
    "fluid": dict(T1=100, T2=900, FLAIR=70, PD=800),
    "lesion": dict(T1=250, T2=750, FLAIR=850, PD=700),
}

EDGE_MM = 0.6  # width of the smooth tissue boundary used for intensities (partial volume)


@dataclass(frozen=True)
class Structure:
    """A solid primitive: an ellipsoid, or a cylinder whose axis is its local z.

    ``radii`` are the semi-axes; for a cylinder the third value is the half length. ``axes`` holds
    the local axes as columns in world space.
    """

    name: str
    label: int
    tissue: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    kind: str = "ellipsoid"
    axes: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    def normalized_radius(self, points: np.ndarray) -> np.ndarray:
        """Distance measure that is < 1 inside, 1 on the surface, > 1 outside."""
        local = (np.asarray(points, dtype=np.float64) - np.asarray(self.center)) @ np.asarray(self.axes)
        scaled = local / np.asarray(self.radii)
        if self.kind == "ellipsoid":
            return np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
        if self.kind == "cylinder":
            radial = np.sqrt(scaled[:, 0] ** 2 + scaled[:, 1] ** 2)
            return np.maximum(radial, np.abs(scaled[:, 2]))
        raise ValueError(f"unknown structure kind {self.kind!r}")

    def normalized_radius_on_grid(
        self, block: tuple[slice, ...], affine: np.ndarray, slice_offset: float = 0.0
    ) -> np.ndarray:
        """``normalized_radius`` at the voxel centres of a grid block, shaped like the block.

        World position is affine in the voxel index, so the structure's local coordinates are a
        sum of one term per array axis; broadcasting them avoids building the (N, 3) points.
        """
        terms = grid_axis_terms(block, affine, slice_offset)
        terms[0] = terms[0] - np.asarray(self.center)
        scaled = [t @ np.asarray(self.axes) / np.asarray(self.radii) for t in terms]
        comp = [
            scaled[0][:, None, None, c] + scaled[1][None, :, None, c] + scaled[2][None, None, :, c] for c in range(3)
        ]
        if self.kind == "ellipsoid":
            return np.sqrt(comp[0] ** 2 + comp[1] ** 2 + comp[2] ** 2)
        return np.maximum(np.sqrt(comp[0] ** 2 + comp[1] ** 2), np.abs(comp[2]))

    def contains(self, points: np.ndarray) -> np.ndarray:
        return self.normalized_radius(points) <= 1.0

    def weight(self, points: np.ndarray) -> np.ndarray:
        """Soft occupancy in [0, 1] with a boundary about EDGE_MM wide."""
        return self._weight_from_radius(self.normalized_radius(points))

    def _weight_from_radius(self, radius: np.ndarray) -> np.ndarray:
        depth_mm = (1.0 - radius) * min(self.radii)
        return 0.5 * (1.0 + np.tanh(depth_mm / EDGE_MM))

    def world_half_extent(self) -> np.ndarray:
        """Half size of the structure's axis-aligned world bounding box, smooth edge included."""
        spans = np.abs(np.asarray(self.axes) * np.asarray(self.radii))
        half = np.sqrt((spans**2).sum(axis=1)) if self.kind == "ellipsoid" else spans.sum(axis=1)
        return half + 4 * EDGE_MM * max(self.radii) / min(self.radii)

    def grid_block(self, shape: tuple[int, ...], affine: np.ndarray) -> tuple[slice, ...] | None:
        """The sub-block of a voxel grid that can overlap the structure, or None if disjoint."""
        half = self.world_half_extent()
        box = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
        ijk = (box + np.asarray(self.center)) @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]
        lo = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, np.asarray(shape[:3]))
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    def transformed(self, rot: np.ndarray, scale: float, shift: np.ndarray) -> Structure:
        """The same structure after world -> scale * rot @ world + shift."""
        center = scale * (rot @ np.asarray(self.center)) + shift
        axes = rot @ np.asarray(self.axes)
        return Structure(
            self.name,
            self.label,
            self.tissue,
            _tuple(center),
            _tuple(np.asarray(self.radii) * scale),
            self.kind,
            tuple(_tuple(r) for r in axes),
        )


@dataclass(frozen=True)
class Lesion:
    """An ellipsoidal lesion in world mm; ``axes`` columns are its principal directions."""

    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    axes: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    location: str = ""

    @property
    def volume_ml(self) -> float:
        a, b, c = self.radii_mm
        return float(4.0 / 3.0 * np.pi * a * b * c / 1000.0)

    @property
    def diameters_mm(self) -> tuple[float, ...]:
        return tuple(sorted((2.0 * r for r in self.radii_mm), reverse=True))

    def structure(self, index: int = 0) -> Structure:
        return Structure(f"lesion {index + 1}", 4, "lesion", self.center_mm, self.radii_mm, "ellipsoid", self.axes)


@dataclass
class Phantom:
    """Anatomy of one body region, evaluated at arbitrary world points (N, 3) in RAS mm."""

    region: str
    structures: list[Structure]
    lesions: list[Lesion] = field(default_factory=list)
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    texture_seed: int = 0
    side: str = ""  # laterality for limbs ("left" / "right"), empty otherwise

    def all_structures(self) -> list[Structure]:
        return [*self.structures, *(les.structure(i) for i, les in enumerate(self.lesions))]

    def labels_at(self, points: np.ndarray) -> np.ndarray:
        """Label (0..4) of each point; later structures and lesions win."""
        points = _as_points(points)
        labels = np.zeros(len(points), dtype=np.uint8)
        for s in self.all_structures():
            labels[s.contains(points)] = s.label
        return labels

    def structure_at(self, point: np.ndarray) -> Structure | None:
        """The innermost anatomical (non-lesion) structure containing one point."""
        p = _as_points(point)
        found = None
        for s in self.structures:
            if bool(s.contains(p)[0]):
                found = s
        return found

    def intensity_at(self, points: np.ndarray, contrast: str, *, texture: bool = True) -> np.ndarray:
        """Noise-free signal of each point for a contrast, with smooth boundaries and texture."""
        if contrast not in CONTRASTS:
            raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
        points = _as_points(points)
        signal = np.zeros(len(points))
        for s in self.all_structures():
            w = s.weight(points)
            signal += w * (TISSUE_SIGNAL[s.tissue][contrast] - signal)
        if texture:
            signal *= self.texture_at(points)
        return signal

    def render(
        self,
        shape: tuple[int, int, int],
        affine: np.ndarray,
        contrast: str,
        slice_offsets: tuple[float, ...] = (0.0,),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Intensity and labels on a voxel grid, evaluating each structure only near itself.

        Equal to ``intensity_at`` / ``labels_at`` at the voxel centres (to within the negligible
        tail of the smooth boundary), but much faster for small structures. The intensity is
        averaged over ``slice_offsets`` (fractions of the slice spacing along k): the slice
        profile that gives thick slices their partial volume.
        """
        if contrast not in CONTRASTS:
            raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
        affine = np.asarray(affine, dtype=np.float64)
        signal = np.zeros((len(slice_offsets), *shape))
        labels = np.zeros(shape, dtype=np.uint8)
        for s in self.all_structures():
            block = s.grid_block(shape, affine)
            if block is None:
                continue
            value = TISSUE_SIGNAL[s.tissue][contrast]
            for n, off in enumerate(slice_offsets):
                w = s._weight_from_radius(s.normalized_radius_on_grid(block, affine, off))
                signal[n][block] += w * (value - signal[n][block])
            labels[block][s.normalized_radius_on_grid(block, affine) <= 1.0] = s.label
        whole = tuple(slice(0, n) for n in shape)
        intensity = signal.mean(axis=0) * self.texture_on_grid(whole, affine)
        return intensity, labels

    def texture_at(self, points: np.ndarray) -> np.ndarray:
        """Multiplicative tissue texture near 1: a few plane waves fixed in world space."""
        wave_vectors, phases = self._waves()
        waves = np.sin(_as_points(points) @ wave_vectors + phases)
        return 1.0 + 0.02 * waves.sum(axis=1)

    def texture_on_grid(self, block: tuple[slice, ...], affine: np.ndarray) -> np.ndarray:
        """``texture_at`` at the voxel centres of a grid block, shaped like the block."""
        wave_vectors, phases = self._waves()
        a, b, c = (t @ wave_vectors for t in grid_axis_terms(block, affine))
        a = a + phases
        total = np.ones([sl.stop - sl.start for sl in block])
        for w in range(len(phases)):
            total += 0.02 * np.sin(a[:, None, None, w] + b[None, :, None, w] + c[None, None, :, w])
        return total

    def _waves(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.texture_seed, 7])
        directions = rng.normal(size=(5, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(6.0, 30.0, size=5)
        phases = rng.uniform(0.0, 2 * np.pi, size=5)
        return directions.T * (2 * np.pi / wavelengths), phases


def block_points(block: tuple[slice, ...], affine: np.ndarray, slice_offset: float = 0.0) -> np.ndarray:
    """World coordinates (N, 3) of the voxel centres of a grid block, C order, shifted along k."""
    a, b, c = grid_axis_terms(block, affine, slice_offset)
    return (a[:, None, None, :] + b[None, :, None, :] + c[None, None, :, :]).reshape(-1, 3)


def _as_points(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {p.shape}")
    return p


def _tuple(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values).ravel())
