"""Training archives from real anatomy: the demo archive's layout and ground truth, with images
from :mod:`engine.synthetic.randomised`.

``write_anatomy_archive(out, studies, seed, assets=DIR)`` writes studies whose regions cycle
brain, knee, spine, abdomen (``brain_share`` raises the share of brains): brains from the MNI152
and Colin27 label maps, the other regions from their phantoms, both randomised the same way.
Beside each series' segment label map it writes ``series_NN_tissues.nii.gz``, the tissue classes
of ``engine.vocabulary.TISSUE_CLASSES``. Everything is a pure function of ``seed`` and the assets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..vocabulary import REGIONS, TISSUE_CLASSES
from .anatomy import build_phantom
from .archive import _prepare_out_dir, _save_labels, _study_identity
from .dicom_writer import SEQUENCE_PARAMS, TRANSFER_SYNTAXES, derive_uid, write_dicom_series
from .label_anatomy import LabelAnatomy, brain_templates, from_phantom
from .manifest import DICOM_DIR, GROUND_TRUTH_DIR, ArchiveManifest, LesionTruth, SeriesTruth, StudyTruth
from .randomised import ACQUISITIONS, Acquisition, StudyDraw, draw_acquisition, draw_study, render_series
from .reports import write_report

GENERATOR = "engine.synthetic.anatomy_archive.write_anatomy_archive"
_ABBREV = {"axial": "AX", "sagittal": "SAG", "coronal": "COR", "oblique": "OBL"}
_EXTRA = {
    "EPI": dict(ScanningSequence="EP", SequenceVariant="SK", RepetitionTime=2000, EchoTime=30),
    "DWI": dict(ScanningSequence="EP", SequenceVariant="SK", RepetitionTime=6000, EchoTime=80),
}


def study_regions(studies: int, brain_share: float = 0.25) -> list[str]:
    """Region of each study: brains first in each cycle, up to ``brain_share``, then the others in turn."""
    others = [r for r in REGIONS if r != "brain"]
    out, n_brain = [], 0
    for s in range(studies):
        if n_brain < brain_share * (s + 1):
            out.append("brain")
            n_brain += 1
        else:
            out.append(others[(s - n_brain) % len(others)])
    return out


def write_anatomy_archive(
    out_dir: str | Path,
    studies: int = 8,
    seed: int = 0,
    *,
    assets: str | Path,
    brain_share: float = 0.25,
    epi_share: float = 0.2,
) -> ArchiveManifest:
    """Write ``studies`` studies of randomised real-anatomy images under ``out_dir``; returns their truth."""
    out_dir = Path(out_dir)
    templates = brain_templates(assets)  # fails naming the missing assets before anything is written
    _prepare_out_dir(out_dir)
    manifest = ArchiveManifest(root=out_dir, seed=seed, studies=[], series=[])
    for s, region in enumerate(study_regions(studies, brain_share)):
        rng = np.random.default_rng([seed, s, 18])
        anatomy = (
            templates[int(rng.integers(len(templates)))]
            if region == "brain"
            else from_phantom(build_phantom(region, rng, n_lesions=0))
        )
        study, series = _write_study(out_dir, s, seed, region, anatomy, rng, epi_share)
        manifest.studies.append(study)
        manifest.series.extend(series)
    manifest.save()
    (out_dir / GROUND_TRUTH_DIR / "generator.json").write_text(
        json.dumps(
            {
                "generator": GENERATOR,
                "seed": seed,
                "studies": studies,
                "brain_share": brain_share,
                "epi_share": epi_share,
                "tissue_classes": {str(k): v for k, v in TISSUE_CLASSES.items()},
            },
            indent=1,
        )
        + "\n"
    )
    return manifest


def _write_study(
    out_dir: Path, s: int, seed: int, region: str, anatomy: LabelAnatomy, rng: np.random.Generator, epi_share: float
) -> tuple[StudyTruth, list[SeriesTruth]]:
    draw = draw_study(anatomy, rng)
    study = _study_identity(s, seed, region, rng)
    truth_dir = out_dir / GROUND_TRUTH_DIR / study.key
    truth_dir.mkdir(parents=True, exist_ok=True)
    n_series = int(rng.integers(2, 4))
    kinds = [str(k) for k in rng.permutation(ACQUISITIONS[:4])[:n_series]]
    if region == "brain" and rng.random() < epi_share * 2:  # EPI / DWI are brain acquisitions
        kinds[-1] = str(rng.choice(ACQUISITIONS[4:]))
    series_truth = []
    for t, kind in enumerate(kinds):
        acq = draw_acquisition(draw, kind, rng)
        series_truth.append(_write_series(out_dir, study, draw, acq, t + 1, seed, rng))
    lesions = [LesionTruth.from_lesion(i, les) for i, les in enumerate(draw.lesions)]
    names = [f"{k} {st.orientation}" for k, st in zip(kinds, series_truth)]
    report = write_report(region, draw.lesions, names, rng, side=anatomy.side)
    (truth_dir / "report.txt").write_text(report)
    (truth_dir / "lesions.json").write_text(
        json.dumps(
            {
                "region": region,
                "side": anatomy.side,
                "anatomy": anatomy.name,
                "lesions": [vars(x) for x in lesions],
                "contrasts": {st.series_uid: st.contrast for st in series_truth},
            },
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
    truth = StudyTruth(
        study_uid=study.uid,
        study_key=study.key,
        patient_id=study.patient.id,
        patient_name=study.patient.name,
        patient_age=study.patient.age_years,
        patient_sex=study.patient.sex,
        study_date=study.tags["StudyDate"],
        region=region,
        side=anatomy.side,
        lesions=lesions,
        lesion_volume_ml=round(sum(x.volume_ml for x in draw.lesions), 4),
        report_path=(truth_dir / "report.txt").relative_to(out_dir).as_posix(),
        report=report,
        series_uids=[st.series_uid for st in series_truth],
    )
    return truth, series_truth


def _write_series(
    out_dir: Path, study, draw: StudyDraw, acq: Acquisition, number: int, seed: int, rng: np.random.Generator
) -> SeriesTruth:
    image, labels, tissues = render_series(draw, acq, rng)
    series_key = f"series_{number:02d}"
    series_uid = derive_uid(seed, study.index, "series", number)
    description = f"{acq.kind} {_ABBREV[acq.orientation]} {study.region.upper()}"
    dicom_dir = out_dir / DICOM_DIR / study.key / series_key
    extra = dict(SEQUENCE_PARAMS.get(acq.kind) or _EXTRA[acq.kind])
    extra["PatientPosition"] = {"supine": "HFS", "prone": "HFP", "decubitus left": "HFDL", "decubitus right": "HFDR"}[
        acq.position
    ]
    paths = write_dicom_series(
        dicom_dir,
        image,
        acq.affine,
        study_uid=study.uid,
        series_uid=series_uid,
        frame_of_reference_uid=study.frame_uid,
        description=description,
        series_number=number,
        slice_thickness=acq.slice_thickness,
        patient=study.patient,
        study_tags=study.tags,
        extra_tags=extra,
        file_names=study.file_names,
    )
    label_path = out_dir / GROUND_TRUTH_DIR / study.key / f"{series_key}_labels.nii.gz"
    _save_labels(label_path, labels, acq.affine)
    _save_labels(label_path.with_name(f"{series_key}_tissues.nii.gz"), tissues, acq.affine)
    return SeriesTruth(
        series_uid=series_uid,
        study_uid=study.uid,
        study_key=study.key,
        series_key=series_key,
        region=study.region,
        contrast=acq.contrast,
        orientation=acq.orientation,
        flip=[],
        oblique_deg=[0.0, 0.0],
        oblique_base="axial",
        description=description,
        shape=list(acq.shape),
        spacing=list(acq.spacing),
        slice_thickness=acq.slice_thickness,
        affine=(np.round(acq.affine, 6) + 0.0).tolist(),
        transfer_syntax=str(TRANSFER_SYNTAXES["explicit"]),
        rescale=[1.0, 0.0],
        pixel_dtype="uint16",
        dicom_dir=dicom_dir.relative_to(out_dir).as_posix(),
        n_files=len(paths),
        label_map=label_path.relative_to(out_dir).as_posix(),
        lesion_voxels={"all": int((labels == 4).sum())},
    )


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description="Write an archive of randomised real-anatomy MR studies with ground truth."
    )
    ap.add_argument("out")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--assets", required=True, help="python -m engine.default_model.assets fetch DIR")
    ap.add_argument("--brain-share", type=float, default=0.25)
    args = ap.parse_args()
    m = write_anatomy_archive(args.out, args.studies, args.seed, assets=args.assets, brain_share=args.brain_share)
    print(f"{len(m.studies)} studies, {len(m.series)} series in {args.out}")
