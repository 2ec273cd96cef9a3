"""The synthetic demo archive: deterministic, valid DICOM, and ground truth that matches the images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, JPEG2000Lossless, MRImageStorage, RLELossless

from engine.geometry import apply_affine, orientation_name, world_to_voxel
from engine.synthetic import (
    CONTRASTS,
    LABEL_NAMES,
    ORIENTATIONS,
    REGIONS,
    ArchiveManifest,
    Lesion,
    Phantom,
    Structure,
    build_phantom,
    encoder_available,
    make_grid,
    write_bad_inputs,
    write_demo_archive,
)
from engine.synthetic.reports import size_text

REQUIRED_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "PatientID",
    "PatientName",
    "StudyDate",
    "SeriesDescription",
    "BodyPartExamined",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
    "RepetitionTime",
    "EchoTime",
    "PixelData",
)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> ArchiveManifest:
    return write_demo_archive(tmp_path_factory.mktemp("demo"), studies=6, seed=0)


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _series_volume(folder: Path) -> np.ndarray:
    """Rescaled pixels stacked in InstanceNumber order as (I, J, K): slice k = data[:, :, k].T."""
    slices = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: int(d.InstanceNumber))
    return np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices], axis=2)


def test_same_seed_gives_byte_identical_files(archive, tmp_path):
    again = write_demo_archive(tmp_path / "again", studies=2, seed=0)
    for sub in ("dicom/study_0000", "dicom/study_0001", "ground_truth/study_0000", "ground_truth/study_0001"):
        assert _digests(again.root / sub) == _digests(archive.root / sub), sub
    assert [s.series_uid for s in again.series] == [s.series_uid for s in archive.series[: len(again.series)]]


def test_different_seed_gives_different_images_and_uids(archive, tmp_path):
    other = write_demo_archive(tmp_path / "other", studies=1, seed=1)
    assert other.studies[0].study_uid != archive.studies[0].study_uid
    assert not set(s.series_uid for s in other.series) & set(s.series_uid for s in archive.series)
    ours = set(_digests(archive.root / "dicom/study_0000").values())
    assert not ours & set(_digests(other.root / "dicom/study_0000").values())


def test_every_file_is_valid_mr_dicom_with_consistent_uids(archive):
    sop_uids = set()
    for series in archive.series:
        study = archive.study_by_uid(series.study_uid)
        files = sorted((archive.root / series.dicom_dir).iterdir())
        assert len(files) == series.n_files == series.shape[2]
        frames = set()
        for path in files:
            ds = pydicom.dcmread(path)
            missing = [t for t in REQUIRED_TAGS if t not in ds]
            assert not missing, f"{path}: missing {missing}"
            assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.file_meta.TransferSyntaxUID == series.transfer_syntax
            for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
                assert UID(uid).is_valid and len(uid) <= 64
            assert ds.StudyInstanceUID == series.study_uid and ds.SeriesInstanceUID == series.series_uid
            assert ds.PatientID == study.patient_id and ds.BodyPartExamined == series.region.upper()
            assert ds.SeriesDescription == series.description
            assert (ds.Rows, ds.Columns) == (series.shape[1], series.shape[0])
            sop_uids.add(ds.SOPInstanceUID)
            frames.add(ds.FrameOfReferenceUID)
        assert len(frames) == 1
    assert len(sop_uids) == sum(s.n_files for s in archive.series)


def test_archive_uses_planned_transfer_syntaxes_and_rescaling(archive):
    syntaxes = {s.transfer_syntax for s in archive.series}
    assert "1.2.840.10008.1.2.1" in syntaxes and "1.2.840.10008.1.2" in syntaxes
    assert (RLELossless in syntaxes) == encoder_available("rle")
    assert (JPEG2000Lossless in syntaxes) == encoder_available("jpeg2000")
    assert {tuple(s.rescale) for s in archive.series} >= {(1.0, 0.0), (0.5, 0.0), (1.25, 200.0)}
    assert {s.pixel_dtype for s in archive.series} == {"uint16", "int16"}
    assert any(not p.suffix for p in (archive.root / "dicom/study_0005").rglob("IM*"))


def test_all_regions_contrasts_orientations_and_a_flip_are_present(archive):
    assert {s.region for s in archive.studies} == set(REGIONS)
    assert {s.orientation for s in archive.series} == set(ORIENTATIONS)
    assert {s.contrast for s in archive.series} <= set(CONTRASTS)
    assert any(s.flip for s in archive.series) and any("slice" in s.flip for s in archive.series)
    for s in archive.series:
        assert orientation_name(s.affine_array) == s.orientation, s.series_key
        assert 2 <= len(archive.study_by_uid(s.study_uid).series_uids) <= 3


def test_label_maps_sit_on_each_series_grid(archive):
    for s in archive.series:
        img = nib.load(archive.root / s.label_map)
        assert img.shape == tuple(s.shape)
        np.testing.assert_allclose(img.affine, s.affine_array, atol=1e-4)
        assert set(np.unique(np.asarray(img.dataobj))) <= set(LABEL_NAMES)


def test_image_intensities_follow_labels_and_contrast(archive):
    """Mean signal per label reproduces the contrast's ordering, so images and labels align."""
    for s in archive.series:
        image = _series_volume(archive.root / s.dicom_dir)
        labels = np.asarray(nib.load(archive.root / s.label_map).dataobj)
        mean = {lab: image[labels == lab].mean() for lab in np.unique(labels)}
        assert mean[0] < 0.2 * mean[1], s.series_key
        if 3 in mean:
            if s.contrast in ("T1", "FLAIR"):
                assert mean[3] < mean[2], s.series_key
            if s.contrast == "T2":
                assert mean[3] > mean[2], s.series_key
        piecewise = np.vectorize(mean.get)(labels)
        assert np.corrcoef(piecewise.ravel(), image.ravel())[0, 1] > 0.8, s.series_key


def test_lesions_are_labelled_where_they_lie(archive):
    for s in archive.series:
        study = archive.study_by_uid(s.study_uid)
        labels = np.asarray(nib.load(archive.root / s.label_map).dataobj)
        assert np.count_nonzero(labels == 4) == sum(s.lesion_voxels.values())
        for lesion in study.lesions:
            ijk = np.rint(world_to_voxel(s.affine_array, np.array([lesion.center_mm])))[0].astype(int)
            if np.all(ijk >= 0) and np.all(ijk < labels.shape):
                assert labels[tuple(ijk)] == 4, (s.series_key, lesion.index)
                assert s.lesion_voxels[str(lesion.index)] > 0
                centre = apply_affine(s.affine_array, ijk[None])[0]
                assert lesion.to_lesion().structure().contains(centre[None])[0]


def test_lesions_have_sizes_and_volumes_in_range(archive):
    assert sum(len(s.lesions) for s in archive.studies) > 0
    for study in archive.studies:
        assert 0 <= len(study.lesions) <= 3
        for les in study.lesions:
            assert 3.5 <= min(les.radii_mm) and max(les.radii_mm) <= 15
            a, b, c = les.radii_mm
            assert les.volume_ml == pytest.approx(4 / 3 * np.pi * a * b * c / 1000, rel=1e-3)
        assert study.lesion_volume_ml == pytest.approx(sum(les.volume_ml for les in study.lesions), abs=1e-3)


def test_reports_mention_region_and_every_lesion(archive):
    for study in archive.studies:
        report = (archive.root / study.report_path).read_text()
        assert report == study.report
        title = {"spine": "LUMBAR SPINE"}.get(study.region, study.region.upper())
        assert f"MRI {study.side.upper() + ' ' if study.side else ''}{title}" in report
        for les in study.lesions:
            assert les.location in report and size_text(les.to_lesion()) in report
        assert ("No acute abnormality" in report) == (not study.lesions)


def test_manifest_round_trips_from_any_entry_point(archive):
    for where in (archive.root, archive.root / "ground_truth", archive.path):
        loaded = ArchiveManifest.load(where)
        assert loaded.to_json() == archive.to_json() and loaded.root == archive.root
    assert archive.dicom_root.is_dir() and not list(archive.dicom_root.rglob("*.nii.gz"))


def test_refuses_to_write_into_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_demo_archive(tmp_path, studies=1)


def test_phantom_contrast_ordering_and_labels():
    phantom = build_phantom("brain", np.random.default_rng(3), n_lesions=1, jitter=False)
    ventricle = np.array([[11.0, 0.0, 12.0]])  # right lateral ventricle centre
    parenchyma = np.array([[40.0, 10.0, 30.0]])
    assert phantom.labels_at(np.vstack([ventricle, parenchyma, [[0, 0, 500.0]]])).tolist() == [3, 2, 0]
    signal = {c: phantom.intensity_at(np.vstack([ventricle, parenchyma]), c, texture=False) for c in CONTRASTS}
    assert signal["T1"][0] < signal["T1"][1] and signal["FLAIR"][0] < signal["FLAIR"][1]
    assert signal["T2"][0] > signal["T2"][1]
    lesion = phantom.lesions[0]
    assert phantom.labels_at(np.array([lesion.center_mm]))[0] == 4
    assert signal["FLAIR"][1] < phantom.intensity_at(np.array([lesion.center_mm]), "FLAIR", texture=False)[0]


def test_grid_rendering_equals_pointwise_evaluation():
    phantom = build_phantom("spine", np.random.default_rng(5), n_lesions=2)
    shape, affine = make_grid(
        "oblique",
        phantom.center_mm,
        shape=(40, 36, 12),
        spacing=(4, 5, 6),
        flip="slice",
        oblique_deg=(18, -22),
    )
    image, labels = phantom.render(shape, affine, "T2")
    idx = np.indices(shape).reshape(3, -1).T
    points = apply_affine(affine, idx)
    np.testing.assert_array_equal(labels.ravel(), phantom.labels_at(points))
    np.testing.assert_allclose(image.ravel(), phantom.intensity_at(points, "T2"), atol=0.5)


def test_make_grid_is_centred_and_flips_axes():
    centre = np.array([10.0, -20.0, 30.0])
    shape, affine = make_grid("axial", centre, fov_mm=(200, 180, 60), spacing=(2, 2, 4))
    assert shape == (100, 90, 15)
    np.testing.assert_allclose(apply_affine(affine, (np.array([shape]) - 1) / 2)[0], centre)
    np.testing.assert_allclose(affine[:3, :3], np.diag([-2.0, -2.0, 4.0]))
    _, flipped = make_grid("axial", centre, shape=shape, spacing=(2, 2, 4), flip=("slice", "row"))
    np.testing.assert_allclose(flipped[:3, :3], np.diag([2.0, -2.0, -4.0]))
    for name in ORIENTATIONS:
        assert orientation_name(make_grid(name, centre, shape=(8, 8, 8), spacing=(1, 1, 1))[1]) == name
    with pytest.raises(ValueError):
        make_grid("axial", centre, shape=(8, 8, 8))


def test_bad_inputs_are_broken_in_the_documented_ways(tmp_path):
    from engine.synthetic.bad_inputs import BASIC_CASES, EXPECTED

    cases = write_bad_inputs(tmp_path, seed=0, cases=BASIC_CASES)
    assert set(cases) == set(BASIC_CASES) == {"not_dicom", "truncated", "missing_slice", "mixed_size", "ct"}
    assert len(EXPECTED) >= 30  # the full corpus documents every hostile class it writes
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(next(cases["not_dicom"].iterdir()))
    truncated = sorted(cases["truncated"].iterdir())
    assert len(truncated) == 8
    with pytest.raises(ValueError):
        pydicom.dcmread(truncated[-1]).pixel_array  # noqa: B018
    pydicom.dcmread(truncated[0]).pixel_array  # noqa: B018
    missing = [pydicom.dcmread(p) for p in cases["missing_slice"].iterdir()]
    assert sorted(int(d.InstanceNumber) for d in missing) == [1, 2, 3, 5, 6, 7, 8]
    mixed = [pydicom.dcmread(p) for p in cases["mixed_size"].iterdir()]
    assert len({d.SeriesInstanceUID for d in mixed}) == 1 and {d.Columns for d in mixed} == {32, 40}
    ct = [pydicom.dcmread(p) for p in cases["ct"].iterdir()]
    assert {d.Modality for d in ct} == {"CT"} and len(ct) == 8


def test_structure_and_lesion_geometry():
    cyl = Structure("rod", 2, "marrow", (0, 0, 0), (5, 5, 20), "cylinder")
    assert cyl.contains(np.array([[4.9, 0, 19.9], [5.1, 0, 0], [0, 0, 20.1]])).tolist() == [
        True,
        False,
        False,
    ]
    lesion = Lesion((1, 2, 3), (10, 5, 2))
    assert lesion.volume_ml == pytest.approx(4 / 3 * np.pi * 100 / 1000)
    assert lesion.diameters_mm == (20, 10, 4)
    assert Phantom("knee", [cyl], [lesion]).labels_at(np.array([[1, 2, 3], [0, 0, 10]])).tolist() == [4, 2]
