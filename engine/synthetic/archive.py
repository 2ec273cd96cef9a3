"""The demo archive: studies of synthetic MRI written as DICOM, with ground truth beside them.

Layout under ``out_dir``::

    dicom/study_0000/series_01/IM0001.dcm ... DICOM, one folder per series (the archive to run on)
    ground_truth/manifest.json                everything, keyed by UIDs (see manifest.py)
    ground_truth/study_0000/report.txt        generated radiology report
    ground_truth/study_0000/lesions.json      lesions in world mm
    ground_truth/study_0000/series_01_labels.nii.gz   label map on the series' own grid

The ground truth sits beside ``dicom/``, not inside it, so that scanning ``dicom/`` finds only
the acquisitions. Everything is a pure function of ``seed``: the same seed gives byte-identical
files.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .acquisition import make_grid, plane_axes
from .anatomy import build_phantom
from .dicom_writer import (
    SEQUENCE_PARAMS,
    TRANSFER_SYNTAXES,
    Patient,
    derive_uid,
    encoder_available,
    write_dicom_series,
)
from .manifest import DICOM_DIR, GROUND_TRUTH_DIR, ArchiveManifest, LesionTruth, SeriesTruth, StudyTruth
from .phantom import CONTRASTS, REGIONS, Phantom, block_points
from .reports import write_report
from .spatial import grid_axis_terms

DEFAULT_FORMATS: tuple[str, ...] = ("explicit", "implicit", "rle", "jpeg2000")
# Extent of each region's anatomy of interest (LR, AP, SI mm), which sets fields of view.
REGION_EXTENT = {
    "brain": (180.0, 230.0, 190.0),
    "knee": (150.0, 150.0, 180.0),
    "spine": (240.0, 220.0, 320.0),
    "abdomen": (320.0, 240.0, 260.0),
}
# Customary planes per region; in every odd-numbered study the second one is acquired double
# oblique instead, so any archive of 3+ studies holds all four orientations.
REGION_PLANES = {
    "brain": ("axial", "coronal", "sagittal"),
    "knee": ("sagittal", "coronal", "axial"),
    "spine": ("sagittal", "axial", "coronal"),
    "abdomen": ("axial", "coronal", "sagittal"),
}
_ABBREV = {"axial": "AX", "sagittal": "SAG", "coronal": "COR", "oblique": "OBL"}
_NOISE_SIGMA = 12.0  # Rician noise, in the same units as phantom.TISSUE_SIGNAL


@dataclass(frozen=True)
class SeriesPlan:
    """How one series is acquired and stored."""

    number: int
    contrast: str
    orientation: str
    flip: tuple[str, ...]
    oblique_deg: tuple[float, float]
    oblique_base: str
    center_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    slice_thickness: float
    transfer_syntax: str
    rescale: tuple[float, float]
    pixel_dtype: str

    def description(self, region: str) -> str:
        return f"{self.contrast} {_ABBREV[self.orientation]} {region.upper()}"


def write_demo_archive(
    out_dir: Path, studies: int = 6, seed: int = 0, *, formats: Sequence[str] = DEFAULT_FORMATS
) -> ArchiveManifest:
    """Write ``studies`` synthetic MRI studies under ``out_dir`` and return their ground truth.

    Regions cycle brain, knee, spine, abdomen; series use each region's customary planes, with a
    double oblique in every odd-numbered study; some series have flipped axes, rescaled or
    signed pixels, and
    (where ``formats`` allows and an encoder is installed) RLE, JPEG 2000 or implicit-VR
    transfer syntaxes; everything else is explicit VR little endian.
    """
    unknown = set(formats) - set(TRANSFER_SYNTAXES)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; expected some of {sorted(TRANSFER_SYNTAXES)}")
    usable = {f for f in formats if encoder_available(f)} | {"explicit"}
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    manifest = ArchiveManifest(root=out_dir, seed=seed, studies=[], series=[])
    series_counter = 0
    for s in range(studies):
        study, series = _write_study(out_dir, s, seed, series_counter, usable)
        manifest.studies.append(study)
        manifest.series.extend(series)
        series_counter += len(series)
    manifest.save()
    return manifest


def plan_study(
    region: str,
    phantom: Phantom,
    study_index: int,
    first_series: int,
    rng: np.random.Generator,
    usable_formats: set[str],
) -> list[SeriesPlan]:
    """2-3 series with different contrasts in the region's customary planes.

    Flips, transfer syntaxes and rescaling follow the archive-wide series counter so that every
    variant appears in the default archive whatever the seed.
    """
    n_series = int(rng.integers(2, 4))
    contrasts = [str(c) for c in rng.permutation(CONTRASTS)[:n_series]]
    plans = []
    for t, contrast in enumerate(contrasts):
        g = first_series + t
        orientation = oblique_base = REGION_PLANES[region][t]
        if study_index % 2 == 1 and t == 1:
            orientation = "oblique"
        flip: tuple[str, ...] = ()
        if g % 4 == 1:
            flip = ("slice",)
        elif g % 4 == 3:
            flip = ("row",) if (g // 4) % 2 == 0 else ("column",)
        oblique = (0.0, 0.0)
        if orientation == "oblique":
            oblique = tuple(float(np.round(rng.choice([-1, 1]) * rng.uniform(15, 25), 2)) for _ in range(2))
        axes = plane_axes(orientation, oblique, oblique_base)
        fov = np.abs(axes).T @ np.asarray(REGION_EXTENT[region])  # extent seen along each grid axis
        pixel = float(np.clip(np.round(max(fov[:2]) / rng.integers(128, 161), 2), 1.0, 2.0))
        inplane = [int(np.clip(round(f / pixel), 96, 160)) for f in fov[:2]]
        slice_spacing = float(rng.choice([2.5, 3.0, 3.5, 4.0, 4.5, 5.0]))
        n_slices = int(np.clip(round(0.75 * fov[2] / slice_spacing), 20, 48))
        center = np.asarray(phantom.center_mm) + rng.uniform(-8, 8, size=3)
        ts = {1: "rle", 4: "jpeg2000", 6: "implicit"}.get(g, "explicit")
        rescale, dtype = {2: ((0.5, 0.0), "uint16"), 3: ((1.25, 200.0), "int16")}.get(g % 5, ((1.0, 0.0), "uint16"))
        plans.append(
            SeriesPlan(
                number=t + 1,
                contrast=contrast,
                orientation=orientation,
                flip=flip,
                oblique_deg=oblique,
                oblique_base=oblique_base,  # type: ignore[arg-type]
                center_mm=tuple(float(v) for v in np.round(center, 2)),  # type: ignore[arg-type]
                shape=(inplane[0], inplane[1], n_slices),
                spacing=(pixel, pixel, slice_spacing),
                slice_thickness=slice_spacing * (0.8 if g % 3 == 2 else 1.0),
                transfer_syntax=ts if ts in usable_formats else "explicit",
                rescale=rescale,
                pixel_dtype=dtype,
            )
        )
    return plans


def sample_series(
    phantom: Phantom, plan: SeriesPlan, affine: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Simulated magnitude image and label map (both (I, J, K)) of a phantom on a grid.

    The image averages the phantom over the slice profile (partial volume), then applies a smooth
    coil bias field and Rician noise; labels are taken at voxel centres.
    """
    third = plan.slice_thickness / plan.spacing[2] / 3.0
    signal, labels = phantom.render(plan.shape, affine, plan.contrast, (-third, 0.0, third))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    a, b, c = (t @ direction for t in grid_axis_terms(tuple(slice(0, n) for n in plan.shape), affine))
    along = a[:, None, None] + b[None, :, None] + c[None, None, :] - np.asarray(phantom.center_mm) @ direction
    signal = signal * (1.0 + 0.12 * np.tanh(along / 150.0))
    noise = rng.normal(scale=_NOISE_SIGMA, size=(2, *plan.shape))
    magnitude = np.hypot(signal + noise[0], noise[1])
    return magnitude, labels


@dataclass(frozen=True)
class _Study:
    """Identity shared by every series of one study."""

    index: int
    key: str
    region: str
    uid: str
    frame_uid: str
    patient: Patient
    tags: dict[str, str]
    file_names: str


def _study_identity(s: int, seed: int, region: str, rng: np.random.Generator) -> _Study:
    date = (dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))).strftime("%Y%m%d")
    age = int(rng.integers(18, 86))
    patient = Patient(
        name=f"DEMO^{s:04d}",
        id=f"DEMO{seed:04d}{s:04d}",
        sex=str(rng.choice(["F", "M"])),
        age_years=age,
        birth_date=f"{int(date[:4]) - age}0101",
    )
    tags = dict(
        StudyDate=date,
        SeriesDate=date,
        ContentDate=date,
        AccessionNumber=f"A{seed:04d}{s:04d}",
        StudyID=str(s + 1),
        StudyDescription=f"MRI {region.upper()}",
        BodyPartExamined=region.upper(),
    )
    return _Study(
        index=s,
        key=f"study_{s:04d}",
        region=region,
        uid=derive_uid(seed, s, "study"),
        frame_uid=derive_uid(seed, s, "frame"),
        patient=patient,
        tags=tags,
        file_names="IM{:04d}" if s % 6 == 5 else "IM{:04d}.dcm",  # one study without extensions
    )


def _write_study(
    out_dir: Path, s: int, seed: int, first_series: int, usable: set[str]
) -> tuple[StudyTruth, list[SeriesTruth]]:
    rng = np.random.default_rng([seed, s])
    region = REGIONS[s % len(REGIONS)]
    phantom = build_phantom(region, rng)
    study = _study_identity(s, seed, region, rng)
    truth_dir = out_dir / GROUND_TRUTH_DIR / study.key
    truth_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_study(region, phantom, s, first_series, rng, usable)
    series_truth = [_write_series(out_dir, study, phantom, plan, seed) for plan in plans]

    names = [f"{p.contrast} {p.orientation}" for p in plans]
    report = write_report(region, phantom.lesions, names, rng, side=phantom.side)
    (truth_dir / "report.txt").write_text(report)
    lesions = [LesionTruth.from_lesion(i, les) for i, les in enumerate(phantom.lesions)]
    lesion_file = {
        "region": region,
        "side": phantom.side,
        "lesions": [vars(les) for les in lesions],
        "contrasts": {st.series_uid: st.contrast for st in series_truth},
    }
    (truth_dir / "lesions.json").write_text(json.dumps(lesion_file, indent=1, sort_keys=True) + "\n")
    truth = StudyTruth(
        study_uid=study.uid,
        study_key=study.key,
        patient_id=study.patient.id,
        patient_name=study.patient.name,
        patient_age=study.patient.age_years,
        patient_sex=study.patient.sex,
        study_date=study.tags["StudyDate"],
        region=region,
        side=phantom.side,
        lesions=lesions,
        lesion_volume_ml=round(sum(les.volume_ml for les in phantom.lesions), 4),
        report_path=(truth_dir / "report.txt").relative_to(out_dir).as_posix(),
        report=report,
        series_uids=[st.series_uid for st in series_truth],
    )
    return truth, series_truth


def _write_series(out_dir: Path, study: _Study, phantom: Phantom, plan: SeriesPlan, seed: int) -> SeriesTruth:
    """Sample, write the DICOM files and the label map of one series; return its ground truth."""
    shape, affine = make_grid(
        plan.orientation,
        plan.center_mm,
        shape=plan.shape,
        spacing=plan.spacing,
        flip=plan.flip,
        oblique_deg=plan.oblique_deg,
        oblique_base=plan.oblique_base,
    )
    image, labels = sample_series(phantom, plan, affine, np.random.default_rng([seed, study.index, plan.number]))
    series_key = f"series_{plan.number:02d}"
    series_uid = derive_uid(seed, study.index, "series", plan.number)
    dicom_dir = out_dir / DICOM_DIR / study.key / series_key
    paths = write_dicom_series(
        dicom_dir,
        image,
        affine,
        study_uid=study.uid,
        series_uid=series_uid,
        frame_of_reference_uid=study.frame_uid,
        description=plan.description(study.region),
        series_number=plan.number,
        transfer_syntax=plan.transfer_syntax,
        rescale=plan.rescale,
        pixel_dtype=plan.pixel_dtype,
        slice_thickness=plan.slice_thickness,
        patient=study.patient,
        study_tags=study.tags,
        extra_tags=SEQUENCE_PARAMS[plan.contrast],
        file_names=study.file_names,
    )
    label_path = out_dir / GROUND_TRUTH_DIR / study.key / f"{series_key}_labels.nii.gz"
    _save_labels(label_path, labels, affine)
    return SeriesTruth(
        series_uid=series_uid,
        study_uid=study.uid,
        study_key=study.key,
        series_key=series_key,
        region=study.region,
        contrast=plan.contrast,
        orientation=plan.orientation,
        flip=list(plan.flip),
        oblique_deg=list(plan.oblique_deg),
        oblique_base=plan.oblique_base,
        description=plan.description(study.region),
        shape=list(shape),
        spacing=list(plan.spacing),
        slice_thickness=plan.slice_thickness,
        affine=(np.round(affine, 6) + 0.0).tolist(),  # + 0.0 turns -0.0 into 0.0
        transfer_syntax=str(TRANSFER_SYNTAXES[plan.transfer_syntax]),
        rescale=list(plan.rescale),
        pixel_dtype=plan.pixel_dtype,
        dicom_dir=dicom_dir.relative_to(out_dir).as_posix(),
        n_files=len(paths),
        label_map=label_path.relative_to(out_dir).as_posix(),
        lesion_voxels=_lesion_voxels(phantom, shape, affine),
    )


def _lesion_voxels(phantom: Phantom, shape: tuple[int, int, int], affine: np.ndarray) -> dict[str, int]:
    """Voxels (centres) of each lesion on a grid; lesions never overlap, so all carry label 4."""
    counts = {}
    for i, lesion in enumerate(phantom.lesions):
        structure = lesion.structure(i)
        block = structure.grid_block(shape, affine)
        inside = structure.contains(block_points(block, affine)) if block is not None else []
        counts[str(i)] = int(np.count_nonzero(inside))
    return counts


def _save_labels(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to write into a folder with foreign content; replace a previous demo archive."""
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return
    if not any(out_dir.iterdir()):
        return
    previous = out_dir / GROUND_TRUTH_DIR / "manifest.json"
    if not previous.is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no demo archive; choose an empty folder")
    old = ArchiveManifest.load(previous)
    for study in old.studies:
        shutil.rmtree(out_dir / DICOM_DIR / study.study_key, ignore_errors=True)
    shutil.rmtree(out_dir / GROUND_TRUTH_DIR, ignore_errors=True)
