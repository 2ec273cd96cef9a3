"""Training data for the default model: synthetic archives loaded exactly as inference loads
them, with targets placed on the encoder's view grid.

Every series goes through ``engine.discover`` and ``engine.views`` (the same code path as
``mrfm run``), so the images the model learns from are the images it later sees. Targets come
from the archive's ground truth: label maps are resampled (nearest neighbour) from their own
grid onto the view grid through the two affines; lesions are placed analytically from their
world-space ellipsoids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from engine.discover import load, scan
from engine.features import View
from engine.geometry import apply_affine, world_to_voxel
from engine.synthetic import ArchiveManifest, LesionTruth, write_demo_archive
from engine.vocabulary import CONTRASTS, REGIONS
from engine.views import make_views

REGION_LIST = tuple(REGIONS)
STUDIES_PER_ARCHIVE = 8  # a multiple of the four regions, so every archive is balanced


@dataclass
class Sample:
    """One encoder input with its targets. ``kind`` is 'global' (every target applies) or
    'tile' (one sliding window: segmentation only, as only the segment head runs on tiles)."""

    kind: str
    study: int  # index of the study across all training archives
    image: np.ndarray  # (X, Y, Z) float32, the view image
    labels: np.ndarray  # (X, Y, Z) uint8 anatomy labels on the view grid
    region: int = -1
    contrast: int = -1
    lesion_volume: float = 0.0  # mL, lesions whose centre lies in the series' field of view
    token_lesion: np.ndarray | None = None  # (N,) float32 in {0, 1}
    phrases: list[str] = field(default_factory=list)
    phrase_tokens: list[np.ndarray] = field(default_factory=list)  # one (N,) bool mask per phrase
    report: str = ""


def lesion_phrase(lesion: LesionTruth) -> str:
    """The short query naming one lesion, as a reader would type it: '<size> mm lesion in the <location>'."""
    return f"{max(lesion.radii_mm) * 2:.0f} mm lesion in the {lesion.location}"


def write_training_archives(root: Path, studies: int, first_seed: int = 1) -> list[ArchiveManifest]:
    """Archives of ``STUDIES_PER_ARCHIVE`` studies from seeds ``first_seed``, ``first_seed + 1``, ...
    until ``studies`` studies exist (seed 0, the demo archive, is kept for evaluation)."""
    if first_seed <= 0:
        raise ValueError("training archives must not use seed 0: it is the held-out demo archive")
    manifests = []
    n_archives = max(1, math.ceil(studies / STUDIES_PER_ARCHIVE))
    for a in range(n_archives):
        n = min(STUDIES_PER_ARCHIVE, studies - a * STUDIES_PER_ARCHIVE)
        folder, seed = root / f"seed_{first_seed + a}", first_seed + a
        previous = folder / "ground_truth" / "manifest.json"  # a rerun reuses what an earlier run wrote
        old = ArchiveManifest.load(previous) if previous.is_file() else None
        reuse = old is not None and old.seed == seed and len(old.studies) == n
        manifests.append(old if reuse else write_demo_archive(folder, studies=n, seed=seed))  # type: ignore[arg-type]
    return manifests


def labels_on_grid(label_path: Path, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A label map resampled (nearest neighbour) onto the grid (``shape``, ``affine``); 0 outside."""
    img = nib.load(str(label_path))
    data = np.asarray(img.dataobj, dtype=np.uint8)
    m = np.linalg.inv(img.affine) @ affine  # target voxel -> world -> label voxel
    return ndimage.affine_transform(
        data, m[:3, :3], offset=m[:3, 3], output_shape=tuple(int(s) for s in shape), order=0, mode="constant", cval=0
    ).astype(np.uint8)


def inside_lesion(lesion: LesionTruth, points: np.ndarray) -> np.ndarray:
    """Which world points (P, 3) lie inside the lesion's ellipsoid (axes columns: its directions)."""
    local = (np.asarray(points) - np.asarray(lesion.center_mm)) @ np.asarray(lesion.axes)
    return ((local / np.asarray(lesion.radii_mm)) ** 2).sum(axis=1) <= 1.0


def lesion_tokens(lesion: LesionTruth, affine: np.ndarray, shape: tuple[int, int, int], patch: int) -> np.ndarray:
    """(N,) bool: tokens whose patch holds a voxel centre inside the lesion, or its centre."""
    grid = tuple(s // patch for s in shape)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    inside = inside_lesion(lesion, apply_affine(affine, idx)).reshape(shape)
    tokens = inside.reshape(grid[0], patch, grid[1], patch, grid[2], patch).any(axis=(1, 3, 5))
    centre = np.floor(world_to_voxel(affine, np.asarray([lesion.center_mm]))[0] + 0.5).astype(int) // patch
    if all(0 <= c < g for c, g in zip(centre, grid)):
        tokens[tuple(centre)] = True
    return tokens.reshape(-1)


def in_field_of_view(points: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Which world points lie within a grid's voxels (half-voxel margins included)."""
    vox = world_to_voxel(affine, np.asarray(points, dtype=np.float64).reshape(-1, 3))
    return ((vox >= -0.5) & (vox <= np.asarray(shape[:3]) - 0.5)).all(axis=1)


def series_samples(
    manifest: ArchiveManifest,
    ref: Any,
    preprocessing: dict[str, Any],
    patch: int,
    study_index: int,
    rng: np.random.Generator,
    tiles_per_series: int = 1,
) -> list[Sample]:
    """The global view of one series with every target, plus up to ``tiles_per_series`` tile
    windows (segmentation targets only) when the tiles view has several windows."""
    truth = manifest.series_by_uid(ref.series_uid)
    study = manifest.study_by_uid(truth.study_uid)
    volume = load(ref)
    views = make_views(volume, preprocessing)
    label_path = manifest.root / truth.label_map
    visible = [
        les for les in study.lesions if in_field_of_view(np.asarray([les.center_mm]), volume.affine, volume.shape)[0]
    ]

    g: View = views["global"]
    image = g.image[0].numpy().astype(np.float32)
    labels = labels_on_grid(label_path, g.affine, g.shape)
    masks = [lesion_tokens(les, g.affine, g.shape, patch) for les in visible]
    token_lesion = np.any(masks, axis=0) if masks else np.zeros(int(np.prod([s // patch for s in g.shape])), bool)
    samples = [
        Sample(
            kind="global",
            study=study_index,
            image=image,
            labels=labels,
            region=REGION_LIST.index(truth.region),
            contrast=CONTRASTS.index(truth.contrast),
            lesion_volume=float(sum(les.volume_ml for les in visible)),
            token_lesion=token_lesion.astype(np.float32),
            phrases=[lesion_phrase(les) for les in visible],
            phrase_tokens=masks,
            report=study.report,
        )
    ]
    t: View = views["tiles"]
    if len(t.windows) > 1 and tiles_per_series > 0:
        tile_labels = labels_on_grid(label_path, t.affine, t.shape)
        for w in rng.permutation(len(t.windows))[:tiles_per_series]:
            win = t.windows[int(w)]
            samples.append(
                Sample(
                    kind="tile",
                    study=study_index,
                    image=t.image[0][win].numpy().astype(np.float32),
                    labels=np.ascontiguousarray(tile_labels[win]),
                )
            )
    return samples


def prepare_samples(
    manifests: list[ArchiveManifest], preprocessing: dict[str, Any], patch: int, seed: int, tiles_per_series: int = 1
) -> list[Sample]:
    """Samples of every series of every archive, in a fixed order (studies by archive, series by UID)."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    study_ids: dict[str, int] = {}
    for manifest in manifests:
        refs = sorted(scan([manifest.dicom_root]).series, key=lambda r: r.series_uid)
        for ref in refs:
            uid = manifest.series_by_uid(ref.series_uid).study_uid
            index = study_ids.setdefault(uid, len(study_ids))
            samples.extend(series_samples(manifest, ref, preprocessing, patch, index, rng, tiles_per_series))
    return samples
