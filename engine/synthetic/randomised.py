"""SynthSeg-style images: a label map of real anatomy, everything the scanner adds randomised.

Following Billot et al. (SynthSeg, Medical Image Analysis 2023), each image starts from a
:class:`~engine.synthetic.label_anatomy.LabelAnatomy` and draws, independently:

- a deformation (random affine plus a smooth non-linear field) shared by a study's series;
- lesions planted in tissue and named by atlas region (shared by the study);
- per-class intensities from a Gaussian mixture around T1, T2, FLAIR or PD prototypes, or an
  EPI / DWI-like acquisition: low resolution, distortion along the phase-encode axis, an N/2 ghost;
- resolution and slice thickness, with the blur they imply (in-plane Gaussian, slice profile);
- field of view and cropping; head position (supine, prone, either decubitus) and motion;
- a bias field and Rician noise.

:func:`draw_study` fixes what a patient carries (deformation, lesions); :func:`render_series` then
acquires one series of it. Both are pure functions of the generator they are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..vocabulary import CONTRASTS
from .acquisition import plane_axes
from .label_anatomy import LabelAnatomy, world_points
from .phantom import TISSUE_SIGNAL, Lesion
from .spatial import random_rotation, rotation

# Relative signal of each brain appearance class per contrast (0..1); the generator jitters each
# image's means around these, so contrast order (CSF dark on T1 and FLAIR, bright on T2) holds
# while the absolute levels vary as they do between scanners.
PROTOTYPES: dict[str, dict[str, float]] = {
    "T1": {"scalp": 0.85, "bone": 0.06, "csf": 0.12, "grey matter": 0.48, "white matter": 0.70, "lesion": 0.32},
    "T2": {"scalp": 0.60, "bone": 0.05, "csf": 1.00, "grey matter": 0.55, "white matter": 0.40, "lesion": 0.85},
    "FLAIR": {"scalp": 0.55, "bone": 0.05, "csf": 0.07, "grey matter": 0.60, "white matter": 0.45, "lesion": 0.95},
    "PD": {"scalp": 0.80, "bone": 0.07, "csf": 0.80, "grey matter": 0.75, "white matter": 0.62, "lesion": 0.85},
    "EPI": {"scalp": 0.20, "bone": 0.04, "csf": 1.00, "grey matter": 0.62, "white matter": 0.46, "lesion": 0.80},
    "DWI": {"scalp": 0.15, "bone": 0.04, "csf": 1.00, "grey matter": 0.58, "white matter": 0.44, "lesion": 0.90},
}
ACQUISITIONS = (*CONTRASTS, "EPI", "DWI")
# EPI BOLD and DWI b=0 images are T2(*)-weighted: the contrast label they train.
CONTRAST_OF = {**{c: c for c in CONTRASTS}, "EPI": "T2", "DWI": "T2"}
POSITIONS = {"supine": 0.0, "prone": 180.0, "decubitus left": 90.0, "decubitus right": -90.0}
REGION_EXTENT = {
    "brain": (170.0, 210.0, 180.0),
    "knee": (150.0, 150.0, 180.0),
    "spine": (240.0, 220.0, 320.0),
    "abdomen": (320.0, 240.0, 260.0),
}
LESION_RADIUS = {"brain": (3.0, 14.0), "knee": (4.0, 9.0), "spine": (4.0, 9.0), "abdomen": (5.0, 15.0)}


def prototype(anatomy: LabelAnatomy, acquisition: str) -> np.ndarray:
    """Mean signal (0..1) of each class of ``anatomy`` for an acquisition."""
    contrast = CONTRAST_OF[acquisition]
    out = []
    for name in anatomy.appearance:
        if name == "background":
            out.append(0.0)
        elif name in PROTOTYPES[acquisition]:
            out.append(PROTOTYPES[acquisition][name])
        else:  # a phantom tissue: its spin-echo signal, fat suppressed on EPI
            v = TISSUE_SIGNAL[name][contrast] / 1000.0
            out.append(v * 0.3 if acquisition in ("EPI", "DWI") and name == "fat" else v)
    return np.asarray(out)


@dataclass
class StudyDraw:
    """What one patient carries into every series: the deformation and the lesions."""

    anatomy: LabelAnatomy
    data: np.ndarray  # class map with lesions planted
    linear: np.ndarray  # 3x3: template -> study world (about ``centre``)
    centre: np.ndarray
    shift: np.ndarray
    field_grid: np.ndarray  # (3, g, g, g) displacement (mm) on a coarse grid over the template box
    lesions: list[Lesion] = field(default_factory=list)
    position: str = "supine"

    def to_template(self, points: np.ndarray) -> np.ndarray:
        """Study-world points (..., 3) to template points: inverse affine, then the smooth field."""
        p = (points - self.centre - self.shift) @ np.linalg.inv(self.linear).T + self.centre
        return p + self._displacement(p)

    def to_world(self, template_point: np.ndarray) -> np.ndarray:
        """A template point to study world (the field's inverse by fixed-point iteration)."""
        q = np.asarray(template_point, float)
        p = q.copy()
        for _ in range(4):
            p = q - self._displacement(p[None])[0]
        return (p - self.centre) @ self.linear.T + self.centre + self.shift

    def _displacement(self, p: np.ndarray) -> np.ndarray:
        shape = np.asarray(self.anatomy.data.shape)
        vox = (p - self.anatomy.affine[:3, 3]) @ np.linalg.inv(self.anatomy.affine[:3, :3]).T
        g = np.asarray(self.field_grid.shape[1:])
        coords = (vox / np.maximum(shape - 1, 1) * (g - 1)).reshape(-1, 3).T
        d = np.stack(
            [ndimage.map_coordinates(self.field_grid[a], coords, order=1, mode="nearest") for a in range(3)], -1
        )
        return d.reshape(p.shape)


def draw_study(anatomy: LabelAnatomy, rng: np.random.Generator, n_lesions: int | None = None) -> StudyDraw:
    """Deformation and lesions of one study (0-3 lesions when ``n_lesions`` is None)."""
    rot = rotation("x", rng.uniform(-12, 12)) @ rotation("y", rng.uniform(-8, 8)) @ rotation("z", rng.uniform(-10, 10))
    scale = np.diag(rng.uniform(0.88, 1.12, size=3))
    shear = np.eye(3) + np.triu(rng.normal(0, 0.03, (3, 3)), 1)
    field_grid = rng.normal(0, rng.uniform(0.5, 3.0), size=(3, 5, 5, 5))
    draw = StudyDraw(
        anatomy, anatomy.data.copy(), rot @ scale @ shear, anatomy.center_mm, rng.uniform(-6, 6, 3), field_grid
    )
    n = int(rng.integers(0, 4)) if n_lesions is None else n_lesions
    for _ in range(n):
        lesion = _plant_lesion(draw, rng)
        if lesion is not None:
            draw.lesions.append(lesion)
    return draw


def _plant_lesion(draw: StudyDraw, rng: np.random.Generator, tries: int = 50) -> Lesion | None:
    """An irregular ellipsoid painted into host tissue (never outside it), named by where its centre lies."""
    a = draw.anatomy
    hosts = [a.class_index(h) for h in a.hosts if h in a.classes]
    if not hosts:
        return None
    candidates = np.argwhere(np.isin(draw.data, hosts))
    lo, hi = LESION_RADIUS[a.region]
    lesion_value = a.class_index("lesion")
    spacing = float(np.sqrt((a.affine[:3, :3] ** 2).sum(axis=0)).mean())
    for _ in range(tries):
        centre_vox = candidates[int(rng.integers(len(candidates)))]
        centre = a.affine[:3, :3] @ centre_vox + a.affine[:3, 3]
        if any(
            np.linalg.norm(centre - draw.to_template(np.asarray(o.center_mm)[None])[0]) < hi * 2 for o in draw.lesions
        ):
            continue
        r = float(rng.uniform(lo, hi))
        radii = r * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
        axes = random_rotation(rng)
        half = int(np.ceil(r / spacing)) + 2
        block = tuple(slice(max(0, c - half), min(n, c + half + 1)) for c, n in zip(centre_vox, draw.data.shape))
        idx = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in block], indexing="ij"), -1)
        local = (idx @ a.affine[:3, :3].T + a.affine[:3, 3] - centre) @ axes
        rough = 1 + 0.15 * ndimage.gaussian_filter(rng.normal(size=idx.shape[:3]), 1.0) * 3
        inside = ((local / radii) ** 2).sum(-1) <= rough
        inside &= np.isin(draw.data[block], hosts)
        if inside.sum() < 4:
            continue
        draw.data[block][inside] = lesion_value
        world_c = draw.to_world(centre)
        world_axes = draw.linear @ axes
        world_axes /= np.linalg.norm(world_axes, axis=0)
        mean_scale = float(np.cbrt(abs(np.linalg.det(draw.linear))))
        return Lesion(
            tuple(float(v) for v in np.round(world_c, 2)),
            tuple(float(v) for v in np.round(radii * mean_scale, 2)),
            tuple(tuple(float(v) for v in row) for row in world_axes),
            a.location(centre),
        )
    return None


@dataclass(frozen=True)
class Acquisition:
    """How one series is acquired: what the randomiser drew for it."""

    kind: str  # one of ACQUISITIONS
    orientation: str
    position: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    slice_thickness: float
    affine: np.ndarray = field(repr=False, compare=False)

    @property
    def contrast(self) -> str:
        return CONTRAST_OF[self.kind]


def draw_acquisition(draw: StudyDraw, kind: str, rng: np.random.Generator) -> Acquisition:
    """Plane, head position, resolution, slice thickness and field of view of one series."""
    region = draw.anatomy.region
    orientation = str(rng.choice(["axial", "axial", "sagittal", "coronal", "oblique"]))
    position = str(rng.choice(list(POSITIONS), p=[0.55, 0.15, 0.15, 0.15]))
    axes = plane_axes(orientation, (rng.uniform(-25, 25), rng.uniform(-25, 25)) if orientation == "oblique" else 0.0)
    axes = (
        rotation("z", POSITIONS[position]) @ axes if region == "brain" else axes
    )  # the patient turned about its long axis
    extent = np.abs(axes).T @ np.asarray(REGION_EXTENT[region])
    if kind in ("EPI", "DWI"):
        pixel = float(rng.uniform(2.5, 4.0))
        inplane = [int(rng.choice([64, 72, 80, 96]))] * 2
        slice_spacing = float(rng.uniform(2.5, 5.0))
    else:
        pixel = float(np.clip(max(extent[:2]) * rng.uniform(0.85, 1.15) / rng.integers(128, 193), 0.7, 2.0))
        inplane = [int(np.clip(round(e * rng.uniform(0.85, 1.15) / pixel), 96, 176)) for e in extent[:2]]
        slice_spacing = float(rng.choice([1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0]))
    coverage = rng.uniform(0.45, 1.1)  # cropped slabs as well as whole-head coverage
    n_slices = int(np.clip(round(coverage * extent[2] / slice_spacing), 12, 112 if slice_spacing < 2 else 64))
    centre = draw.centre + draw.shift + rng.uniform(-15, 15, 3)
    spacing = np.array([pixel, pixel, slice_spacing])
    shape = (inplane[0], inplane[1], n_slices)
    linear = axes * spacing
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((np.asarray(shape) - 1) / 2.0)
    thickness = slice_spacing * float(rng.uniform(0.8, 1.0))
    return Acquisition(kind, orientation, position, shape, (pixel, pixel, slice_spacing), round(thickness, 3), affine)


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, coarse: int = 4) -> np.ndarray:
    """A smooth random field (zero mean, unit-ish amplitude) on ``shape``, from a coarse grid."""
    small = rng.normal(size=(coarse, coarse, coarse))
    return ndimage.zoom(small, np.asarray(shape) / coarse, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]


def render_series(
    draw: StudyDraw, acq: Acquisition, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, segment labels, tissue classes) of one series, each (I, J, K) on ``acq``'s grid."""
    a = draw.anatomy
    shape = acq.shape
    epi = acq.kind in ("EPI", "DWI")
    inv = np.linalg.inv(a.affine)
    offsets = (-1 / 3, 0.0, 1 / 3) if acq.slice_thickness > 1.5 * min(acq.spacing[:2]) else (0.0,)
    motion = rng.random() < 0.3
    slice_shift = rng.normal(0, 1.2, size=(shape[2], 3)) * (rng.random(shape[2]) < 0.25)[:, None] if motion else None
    distortion = _smooth_field(shape, rng) * rng.uniform(2.0, 6.0) if epi else None
    phase_dir = acq.affine[:3, 1] / np.linalg.norm(acq.affine[:3, 1])

    mean = prototype(a, acq.kind) * np.exp(rng.normal(0, 0.15, len(a.classes)))
    mean[0] = 0.0
    sd = mean * rng.uniform(0.02, 0.08, len(a.classes))
    texture = ndimage.gaussian_filter(rng.normal(size=shape), rng.uniform(0.6, 1.5))
    texture /= max(float(texture.std()), 1e-6)
    pts = world_points(shape, acq.affine)
    if slice_shift is not None:
        pts = pts + slice_shift[None, None, :, :]
    if distortion is not None:
        pts = pts + distortion[..., None] * phase_dir
    centre_vox = draw.to_template(pts.reshape(-1, 3)) @ inv[:3, :3].T + inv[:3, 3]
    # the slice profile: the same points moved through the slice (the smooth field barely changes over a slice)
    step = inv[:3, :3] @ np.linalg.inv(draw.linear) @ acq.affine[:3, 2] * (acq.slice_thickness / acq.spacing[2])
    signal = np.zeros(shape)
    centre_classes = ndimage.map_coordinates(draw.data, centre_vox.T, order=0, mode="constant", cval=0).reshape(shape)
    for off in offsets:
        classes = (
            centre_classes
            if off == 0.0
            else ndimage.map_coordinates(
                draw.data, (centre_vox + off * step).T, order=0, mode="constant", cval=0
            ).reshape(shape)
        )
        signal += mean[classes] + sd[classes] * texture
    signal /= len(offsets)
    # the scanner's point spread: about half a voxel in-plane (the slice profile is sampled above)
    signal = ndimage.gaussian_filter(signal, (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), 0.0))
    signal *= np.exp(_smooth_field(shape, rng, 3) * rng.uniform(0.0, 0.3))  # coil bias
    if epi:
        ghost = rng.uniform(0.03, 0.12)
        signal = signal + ghost * np.roll(signal, shape[1] // 2, axis=1)
    sigma = rng.uniform(0.01, 0.05 if not epi else 0.08) * float(np.percentile(signal, 99))
    magnitude = np.hypot(signal + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    magnitude *= rng.uniform(800, 3000)
    segment = np.asarray(a.segment, np.uint8)[centre_classes]
    tissues = np.asarray(a.tissue, np.uint8)[centre_classes]
    return magnitude.astype(np.float32), segment, tissues
