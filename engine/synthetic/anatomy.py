"""Per-region anatomy, lesion placement and the location words reports use.

Coordinates are RAS+ mm around the region's centre: +x is the patient's right, +y anterior,
+z superior. Each study jitters the anatomy by a small rigid transform and scale so that no two
studies are identical.
"""

from __future__ import annotations

import numpy as np

from .phantom import REGIONS, Lesion, Phantom, Structure
from .spatial import random_rotation, rotation

E, C = "ellipsoid", "cylinder"


def _rot_axes(axis: str, degrees: float) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in rotation(axis, degrees))


def _brain() -> list[Structure]:
    return [
        Structure("head", 1, "soft", (0, 0, 0), (72, 92, 80)),
        Structure("nose", 1, "soft", (0, 90, -32), (12, 14, 20)),
        Structure("brain", 2, "brain", (0, -3, 8), (62, 80, 64)),
        Structure("cerebellum", 2, "brain", (0, -52, -42), (45, 24, 20)),
        Structure("left lateral ventricle", 3, "csf", (-11, 0, 12), (5, 24, 8), E, _rot_axes("z", 10)),
        Structure("right lateral ventricle", 3, "csf", (11, 0, 12), (5, 24, 8), E, _rot_axes("z", -10)),
        Structure("third ventricle", 3, "csf", (0, -5, 0), (2, 12, 6)),
    ]


def _knee() -> list[Structure]:
    return [
        Structure("soft tissue", 1, "fat", (0, 0, 0), (56, 52, 110), C),
        Structure("muscle", 1, "muscle", (0, -12, 0), (44, 36, 110), C),
        Structure("femoral shaft", 2, "marrow", (0, -5, 60), (14, 14, 55), C),
        Structure("femoral condyles", 2, "marrow", (0, -8, 12), (38, 28, 18)),
        Structure("tibial plateau", 2, "marrow", (0, -6, -14), (36, 26, 10)),
        Structure("tibial shaft", 2, "marrow", (0, -6, -62), (15, 15, 48), C),
        Structure("patella", 2, "marrow", (0, 40, 18), (20, 8, 18)),
        Structure("joint space", 3, "fluid", (0, -6, -3), (34, 24, 2.5)),
        Structure("suprapatellar recess", 3, "fluid", (0, 26, 40), (20, 5, 14)),
    ]


VERTEBRA_Z = (74.0, 37.0, 0.0, -37.0, -74.0)  # L1 .. L5 centres
LEVELS = ("L1", "L2", "L3", "L4", "L5")


def _spine() -> list[Structure]:
    s = [
        Structure("torso", 1, "fat", (0, 10, 0), (140, 100, 170), C),
        Structure("trunk", 1, "soft", (0, 10, 0), (125, 86, 170), C),
        Structure("right paraspinal muscle", 1, "muscle", (30, -45, 0), (20, 22, 170), C),
        Structure("left paraspinal muscle", 1, "muscle", (-30, -45, 0), (20, 22, 170), C),
        Structure("aorta", 3, "fluid", (-20, 48, 0), (11, 11, 170), C),
    ]
    for i, (z, level) in enumerate(zip(VERTEBRA_Z, LEVELS, strict=True)):
        s.append(Structure(f"{level} vertebral body", 2, "marrow", (0, 20, z), (22, 17, 13), C))
        s.append(Structure(f"{level} spinous process", 2, "marrow", (0, -36, z - 4), (5, 14, 10)))
        below = LEVELS[i + 1] if i + 1 < len(LEVELS) else "S1"
        s.append(Structure(f"{level}-{below} disc", 1, "disc", (0, 20, z - 18.5), (21, 16, 5), C))
    s += [
        Structure("spinal canal", 3, "csf", (0, -8, 0), (9, 8, 170), C),
        Structure("conus medullaris", 2, "cord", (0, -8, 110), (4, 4, 70), C),
    ]
    return s


def _abdomen() -> list[Structure]:
    return [
        Structure("body wall", 1, "fat", (0, 0, 0), (140, 100, 160), C),
        Structure("abdominal cavity", 1, "soft", (0, 0, 0), (124, 84, 160), C),
        Structure("liver", 2, "liver", (55, 10, 25), (75, 62, 70), E, _rot_axes("z", 12)),
        Structure("spleen", 2, "spleen", (-85, -25, 35), (24, 40, 45), E, _rot_axes("z", -25)),
        Structure("right kidney", 2, "kidney", (65, -45, -25), (26, 22, 50), E, _rot_axes("y", 10)),
        Structure("left kidney", 2, "kidney", (-65, -45, -15), (26, 22, 50), E, _rot_axes("y", -10)),
        Structure("vertebra", 2, "marrow", (0, -55, 0), (20, 18, 160), C),
        Structure("spinal canal", 3, "csf", (0, -78, 0), (7, 7, 160), C),
        Structure("aorta", 3, "fluid", (-15, -30, 0), (11, 11, 160), C),
        Structure("gallbladder", 3, "fluid", (40, 48, -15), (14, 14, 30)),
        Structure("stomach", 3, "fluid", (-45, 30, 55), (35, 24, 25)),
    ]


ANATOMY = {"brain": _brain, "knee": _knee, "spine": _spine, "abdomen": _abdomen}
# Structures a lesion may grow in, and its size range (radius mm) per region.
LESION_HOSTS = {
    "brain": ("brain",),
    "knee": ("femoral condyles", "tibial plateau", "femoral shaft", "tibial shaft"),
    "spine": tuple(f"{lv} vertebral body" for lv in LEVELS),
    "abdomen": ("liver", "spleen", "right kidney", "left kidney"),
}
LESION_RADIUS = {"brain": (5.0, 15.0), "knee": (5.0, 9.0), "spine": (5.0, 9.0), "abdomen": (5.0, 15.0)}


def build_phantom(
    region: str, rng: np.random.Generator, n_lesions: int | None = None, *, jitter: bool = True
) -> Phantom:
    """A randomised phantom of one region with ``n_lesions`` lesions (0-3, random if None)."""
    if region not in ANATOMY:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    structures = ANATOMY[region]()
    if jitter:
        rot = rotation("z", rng.uniform(-5, 5)) @ rotation("x", rng.uniform(-4, 4))
        scale = float(rng.uniform(0.93, 1.07))
        shift = rng.uniform(-6, 6, size=3)
        structures = [s.transformed(rot, scale, shift) for s in structures]
        center = tuple(float(v) for v in shift)
    else:
        center = (0.0, 0.0, 0.0)
    side = str(rng.choice(["left", "right"])) if region == "knee" else ""
    phantom = Phantom(region, structures, [], center, int(rng.integers(2**31)), side)
    n = int(rng.integers(0, 4)) if n_lesions is None else n_lesions
    for _ in range(n):
        lesion = _place_lesion(phantom, rng)
        if lesion is not None:
            phantom.lesions.append(lesion)
    return phantom


def _place_lesion(phantom: Phantom, rng: np.random.Generator, tries: int = 200) -> Lesion | None:
    """A lesion centred inside one of the region's host structures, clear of other lesions."""
    hosts = [s for s in phantom.structures if s.name in LESION_HOSTS[phantom.region]]
    lo, hi = LESION_RADIUS[phantom.region]
    for _ in range(tries):
        host = hosts[int(rng.integers(len(hosts)))]
        local = rng.uniform(-0.6, 0.6, size=3) * np.asarray(host.radii)
        center = np.asarray(host.center) + np.asarray(host.axes) @ local
        if phantom.labels_at(center)[0] != 2:
            continue
        r = float(rng.uniform(lo, hi))
        radii = r * np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
        if any(np.linalg.norm(center - np.asarray(o.center_mm)) < r + max(o.radii_mm) + 3 for o in phantom.lesions):
            continue
        axes = random_rotation(rng)
        return Lesion(
            tuple(float(v) for v in np.round(center, 2)),
            tuple(float(v) for v in np.round(radii, 2)),
            tuple(tuple(float(v) for v in row) for row in axes),
            location_words(phantom, center),
        )
    return None


def location_words(phantom: Phantom, point: np.ndarray) -> str:
    """Radiology-style location of a world point, e.g. 'left frontal lobe' or 'L3 vertebral body'."""
    p = np.asarray(point, dtype=np.float64).ravel()
    host = phantom.structure_at(p)
    name = host.name if host is not None else "soft tissues"
    local = p - np.asarray(phantom.center_mm)
    if phantom.region == "brain":
        side = "right" if local[0] > 4 else "left" if local[0] < -4 else "midline"
        if name == "cerebellum":
            return f"{side} cerebellar hemisphere" if side != "midline" else "cerebellar vermis"
        lobe = (
            "frontal"
            if local[1] > 15
            else "occipital"
            if local[1] < -45
            else "temporal"
            if local[2] < -5
            else "parietal"
        )
        return f"{side} {lobe} lobe" if side != "midline" else f"midline {lobe} region"
    if phantom.region == "knee":
        # Medial is toward the body's midline: patient-left (-x) for a right knee.
        medial = local[0] < 0 if phantom.side == "right" else local[0] > 0
        part = {
            "femoral condyles": "femoral condyle",
            "tibial plateau": "tibial plateau",
            "femoral shaft": "distal femoral metaphysis",
            "tibial shaft": "proximal tibial metaphysis",
        }
        return f"{'medial' if medial else 'lateral'} {part.get(name, name)}"
    if phantom.region == "abdomen" and name == "liver":
        return "right hepatic lobe" if local[0] > 40 else "left hepatic lobe"
    return name
