"""Label maps of real anatomy (and of the region phantoms) that the randomised generator draws from.

A :class:`LabelAnatomy` is a voxel map of *appearance classes* (each with its own intensity
distribution: scalp, bone, CSF, grey matter, ...) on a grid with a RAS+ mm affine, plus what each
class means: its segment label (``engine.vocabulary.LABEL_NAMES``) and tissue class
(``engine.vocabulary.TISSUE_CLASSES``).

Brains come from real templates (``engine.default_model.assets``): the MNI152 2009 T1 with its GM
and WM probability maps, and Colin27 (``ch2`` with its brain-extracted ``ch2bet``). From each:
the head (Otsu threshold, largest component, holes filled), the brain (GM + WM, closed and
filled; ``ch2bet`` for Colin), CSF (brain voxels that are neither GM nor WM, plus a thin
subarachnoid rim), bone (dark voxels between brain and scalp) and scalp (the rest of the head).
Colin27's CSF/GM/WM split is a three-class k-means of its T1 inside ``ch2bet``. Lobe names come
from the AAL atlas (its label codes name the lobe), nearest labelled voxel for white matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..vocabulary import LESION_LABEL
from .spatial import grid_axis_terms

# appearance classes of the brain maps: name -> (segment label, tissue class)
BRAIN_CLASSES: dict[str, tuple[int, int]] = {
    "background": (0, 0),
    "scalp": (1, 1),
    "bone": (1, 1),
    "csf": (3, 4),
    "grey matter": (2, 2),
    "white matter": (2, 3),
    "lesion": (LESION_LABEL, 5),
}
WORKING_MM = 1.5  # the grid brains are kept on: detail finer than any acquisition here, a quarter of the voxels


@dataclass
class LabelAnatomy:
    """Appearance classes on a voxel grid; ``classes[i]`` names value ``i``."""

    name: str
    region: str
    data: np.ndarray  # (X, Y, Z) uint8 class values
    affine: np.ndarray  # voxel -> RAS mm
    classes: list[str]
    segment: list[int]  # segment label of each class
    tissue: list[int]  # tissue class of each class
    appearance: list[str]  # intensity family of each class (a key of appearance.PROTOTYPES)
    lobes: np.ndarray | None = None  # (X, Y, Z) uint8 index into lobe_names, 0 = none
    lobe_names: list[str] = field(default_factory=list)
    hosts: tuple[str, ...] = ()  # classes a lesion may grow in
    side: str = ""

    @property
    def center_mm(self) -> np.ndarray:
        """Centre of the non-background voxels, in world mm."""
        idx = np.argwhere(self.data > 0).mean(axis=0)
        return self.affine[:3, :3] @ idx + self.affine[:3, 3]

    def class_index(self, name: str) -> int:
        return self.classes.index(name)

    def location(self, point_mm: np.ndarray) -> str:
        """The words a report uses for a world point: the AAL lobe, else the class it lies in."""
        vox = np.round(np.linalg.solve(self.affine[:3, :3], np.asarray(point_mm) - self.affine[:3, 3])).astype(int)
        inside = all(0 <= v < n for v, n in zip(vox, self.data.shape))
        if self.lobes is not None and inside:
            k = int(self.lobes[tuple(vox)])
            if k:
                return self.lobe_names[k]
        return self.classes[int(self.data[tuple(vox)])] if inside else "soft tissues"


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    between = w0 * w1 * (m0 / np.maximum(w0, 1) - (m0[-1] - m0) / np.maximum(w1, 1)) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _three_class_cuts(values: np.ndarray, iterations: int = 20) -> tuple[float, float]:
    """Cuts between three intensity classes (CSF < GM < WM on T1): 1-D k-means from the 5th, 50th
    and 95th percentiles, each cut halfway between neighbouring means."""
    means = np.percentile(values, [5, 50, 95]).astype(float)
    for _ in range(iterations):
        cuts = (means[:-1] + means[1:]) / 2
        group = np.searchsorted(cuts, values)
        means = np.array([values[group == g].mean() if (group == g).any() else means[g] for g in range(3)])
    cuts = (means[:-1] + means[1:]) / 2
    return float(cuts[0]), float(cuts[1])


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    # closing first: the dark skull can part the scalp from the brain by a few voxels
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=4, border_value=0))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def _load(path: Path, working: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An image's data and affine, resampled (linear) to WORKING_MM voxels when ``working``."""
    import nibabel as nib  # heavy: only the generator needs it

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not working:
        return data, affine
    zoom = np.sqrt((affine[:3, :3] ** 2).sum(axis=0)) / WORKING_MM
    out = ndimage.zoom(data, zoom, order=1)
    scale = np.diag([*(np.asarray(data.shape) / np.asarray(out.shape)), 1.0])
    return out.astype(np.float32), affine @ scale


def _resample_to(
    data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target: np.ndarray, order: int
) -> np.ndarray:
    m = np.linalg.inv(affine) @ target
    return ndimage.affine_transform(
        data, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=order, mode="constant", cval=0
    )


def _brain_classes(
    t1: np.ndarray, brain: np.ndarray, gm: np.ndarray, wm: np.ndarray, head: np.ndarray | None = None
) -> np.ndarray:
    """Class map from a T1, a brain mask and GM / WM membership (each bool); ``head`` where the
    T1 is skull-stripped and cannot give it."""
    if head is None:
        head = _largest_filled(t1 > _otsu(t1[t1 > 0]) * 0.5)
    head = head | ndimage.binary_dilation(brain, iterations=4)  # at least ~6 mm of skull and scalp
    rim = ndimage.binary_dilation(brain, iterations=1) & head & ~brain  # subarachnoid CSF, about 1.5 mm
    out = np.zeros(t1.shape, np.uint8)
    names = list(BRAIN_CLASSES)
    out[head] = names.index("scalp")
    outside = head & ~brain & ~rim
    inner = ndimage.binary_dilation(brain, iterations=6) & outside  # the skull lies within ~9 mm of the brain
    dark = t1 <= np.percentile(t1[head], 25)
    out[inner & dark] = names.index("bone")
    out[rim] = names.index("csf")
    out[brain] = names.index("csf")
    out[brain & gm] = names.index("grey matter")
    out[brain & wm] = names.index("white matter")
    return out


def _lobe_words(code: int, name: str) -> str:
    side = "left" if name.endswith("_L") else "right" if name.endswith("_R") else ""
    group = code // 1000
    if group == 9:
        return f"{side} cerebellar hemisphere" if side else "cerebellar vermis"
    word = {
        2: "frontal lobe",
        3: "insula",
        4: "cingulate gyrus",
        5: "occipital lobe",
        6: "parietal lobe",
        8: "temporal lobe",
    }.get(group)
    if group == 4 and ("Hippocampus" in name or "Amygdala" in name):
        word = "mesial temporal lobe"
    if group == 7:
        word = "thalamus" if name.startswith("Thalamus") else "basal ganglia"
    return f"{side} {word}".strip()


def _aal(templates: Path, shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """AAL lobe index on a grid (nearest labelled voxel inside the brain) and the index's words."""
    data, aff = _load(templates / "aal.nii.gz", working=False)
    rows = [line.split() for line in (templates / "aal.nii.txt").read_text().splitlines() if line.strip()]
    words = sorted({_lobe_words(int(code), name) for _, name, code in rows})
    names = [""] + words
    lut = np.zeros(int(data.max()) + 1, np.uint8)
    for index, name, code in rows:
        lut[int(index)] = names.index(_lobe_words(int(code), name))
    lobes = lut[_resample_to(data.astype(np.int32), aff, shape, affine, 0)]
    _, nearest = ndimage.distance_transform_edt(lobes == 0, return_indices=True)
    return lobes[tuple(nearest)], names


def _finish(name: str, classes: np.ndarray, affine: np.ndarray, templates: Path) -> LabelAnatomy:
    names = list(BRAIN_CLASSES)
    lobes, lobe_names = _aal(templates, classes.shape, affine)
    lobes[~np.isin(classes, [names.index("grey matter"), names.index("white matter")])] = 0
    return LabelAnatomy(
        name,
        "brain",
        classes,
        affine,
        names,
        [v[0] for v in BRAIN_CLASSES.values()],
        [v[1] for v in BRAIN_CLASSES.values()],
        names,
        lobes,
        lobe_names,
        ("white matter", "grey matter"),
    )


@lru_cache(maxsize=4)
def mni152(assets: str) -> LabelAnatomy:
    """The MNI152 2009 template's classes (GM / WM where their probability is highest and >= 0.5).

    nilearn's copy of the T1 is skull-stripped, so the head around it is Colin27's (both sit in
    MNI space), widened where the brain would otherwise touch it."""
    from ..default_model.assets import require  # the asset list lives with the recipe that fetches it

    files = require(assets)
    t1, affine = _load(files["mni_t1"])
    gm, _ = _load(files["mni_gm"])
    wm, _ = _load(files["mni_wm"])
    gm, wm = gm / max(float(gm.max()), 1e-6), wm / max(float(wm.max()), 1e-6)  # stored as 0..255
    parenchyma = (gm + wm) >= 0.5
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(parenchyma, iterations=2)) | (t1 > 0)
    colin, colin_affine = _load(files["colin"])
    head = _resample_to(colin, colin_affine, t1.shape, affine, 1)
    head = _largest_filled(head > _otsu(colin[colin > 0]) * 0.5)
    classes = _brain_classes(
        np.where(head & ~brain, 0.0, t1), brain, parenchyma & (gm >= wm), parenchyma & (wm > gm), head
    )
    return _finish("MNI152 2009", classes, affine, files["aal"].parent)


@lru_cache(maxsize=4)
def colin27(assets: str) -> LabelAnatomy:
    """Colin27's classes: ch2bet is the brain; inside it CSF / GM / WM by a three-class k-means of its T1."""
    from ..default_model.assets import require  # the asset list lives with the recipe that fetches it

    files = require(assets)
    t1, affine = _load(files["colin"])
    bet, bet_affine = _load(files["colin_brain"])
    bet = _resample_to(bet, bet_affine, t1.shape, affine, 1)
    brain = ndimage.binary_fill_holes(bet > 0)
    csf_cut, gm_cut = _three_class_cuts(t1[brain])
    parenchyma = brain & (t1 > csf_cut)
    classes = _brain_classes(t1, brain, parenchyma & (t1 <= gm_cut), parenchyma & (t1 > gm_cut))
    return _finish("Colin27", classes, affine, files["aal"].parent)


def brain_templates(assets: str | Path) -> list[LabelAnatomy]:
    return [mni152(str(assets)), colin27(str(assets))]


def from_phantom(phantom: object, spacing: float = 1.5) -> LabelAnatomy:
    """A region phantom (``engine.synthetic.phantom.Phantom``) painted on a grid: one class per
    structure, its appearance the structure's tissue; lesions are planted later, as for brains."""
    structures = list(phantom.structures)  # type: ignore[attr-defined]
    lo = np.min([np.asarray(s.center) - s.world_half_extent() for s in structures], axis=0) - 4
    hi = np.max([np.asarray(s.center) + s.world_half_extent() for s in structures], axis=0) + 4
    shape = tuple(int(v) for v in np.ceil((hi - lo) / spacing) + 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    data = np.zeros(shape, np.uint8)
    for i, s in enumerate(structures):
        block = s.grid_block(shape, affine)
        if block is not None:
            data[block][s.normalized_radius_on_grid(block, affine) <= 1.0] = i + 1
    names = ["background", *(s.name for s in structures), "lesion"]
    hosts = {
        "brain": ("brain",),
        "knee": ("femoral condyles", "tibial plateau"),
        "spine": (
            "L1 vertebral body",
            "L2 vertebral body",
            "L3 vertebral body",
            "L4 vertebral body",
            "L5 vertebral body",
        ),
        "abdomen": ("liver", "spleen", "right kidney", "left kidney"),
    }
    tissue_of_label = {0: 0, 1: 1, 2: 2, 3: 4, LESION_LABEL: 5}
    return LabelAnatomy(
        f"{phantom.region} phantom",
        phantom.region,
        data,
        affine,
        names,  # type: ignore[attr-defined]
        [0, *(s.label for s in structures), LESION_LABEL],
        [0, *(tissue_of_label[s.label] for s in structures), 5],
        ["background", *(s.tissue for s in structures), "lesion"],
        hosts=hosts[phantom.region],  # type: ignore[attr-defined]
        side=phantom.side,  # type: ignore[attr-defined]
    )


def world_points(shape: tuple[int, ...], affine: np.ndarray, slice_offset: float = 0.0) -> np.ndarray:
    """(X, Y, Z, 3) world coordinates of a grid's voxel centres."""
    a, b, c = grid_axis_terms(tuple(slice(0, int(n)) for n in shape), affine, slice_offset)
    return a[:, None, None, :] + b[None, :, None, :] + c[None, None, :, :]
