"""The same anatomy lands at the same world coordinates whatever the acquisition.

Three objects of different intensity, placed asymmetrically, are written as DICOM from axial,
sagittal, coronal, double-oblique and axis-flipped acquisitions. Read back three independent ways
(a few lines of pydicom here, dcm2niix, and the engine's loader) each object's centroid must sit
at its true world position.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from engine.geometry import LPS_TO_RAS, apply_affine, orientation_name
from engine.synthetic import Phantom, Structure, derive_uid, make_grid, write_demo_archive, write_dicom_series
from test_dicom_loading import dcm2niix_binary

# Label -> (world centre RAS mm, radius mm, intensity). Off-centre and not collinear with the
# grid centre, so any mirrored, swapped or rotated axis moves at least one centroid.
OBJECTS = {
    1: ((30.0, -18.0, 12.0), 12.0, 1000.0),
    2: ((-22.0, 25.0, -8.0), 9.0, 600.0),
    3: ((5.0, 8.0, 28.0), 7.0, 300.0),
}
CENTRE = (2.0, 3.0, 4.0)
# name -> (orientation, flips, oblique angles, in-plane shape, spacing)
ACQUISITIONS = {
    "axial": ("axial", (), 0.0, (72, 60, 30), (1.2, 1.6, 3.0)),
    "sagittal": ("sagittal", (), 0.0, (60, 72, 26), (1.5, 1.3, 3.5)),
    "coronal": ("coronal", (), 0.0, (66, 60, 24), (1.4, 1.5, 4.0)),
    "oblique": ("oblique", (), (22.0, -17.0), (70, 64, 34), (1.5, 1.5, 3.2)),
    "axial_descending": ("axial", ("slice",), 0.0, (64, 72, 30), (1.6, 1.2, 3.0)),
    "sagittal_row_flipped": ("sagittal", ("row",), 0.0, (60, 64, 28), (1.5, 1.5, 3.0)),
    "coronal_column_flipped": ("coronal", ("column",), 0.0, (60, 60, 25), (1.5, 1.5, 4.0)),
    "oblique_all_flipped": (
        "oblique",
        ("row", "column", "slice"),
        (-19.0, 24.0),
        (72, 76, 30),
        (1.5, 1.4, 3.5),
    ),
}


def _phantom() -> Phantom:
    tissues = {1: "fat", 2: "brain", 3: "lesion"}
    structures = [Structure(f"object {lab}", lab, tissues[lab], c, (r, r, r)) for lab, (c, r, _) in OBJECTS.items()]
    return Phantom("brain", structures)


def _acquire(tmp: Path, name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write one acquisition; returns its folder, its true affine and its true label map."""
    orientation, flip, oblique, shape, spacing = ACQUISITIONS[name]
    shape, affine = make_grid(orientation, CENTRE, shape=shape, spacing=spacing, flip=flip, oblique_deg=oblique)
    labels = _phantom().labels_at(apply_affine(affine, np.indices(shape).reshape(3, -1).T)).reshape(shape)
    image = np.zeros(shape)
    for lab, (_, _, value) in OBJECTS.items():
        image[labels == lab] = value
    folder = tmp / name
    write_dicom_series(
        folder,
        image,
        affine,
        study_uid=derive_uid("geometry", "study"),
        series_uid=derive_uid("geometry", name),
        description=name.upper(),
        rescale=(0.5, -100.0) if "flipped" in name else (1.0, 0.0),
    )
    return folder, affine, labels


@pytest.fixture(scope="module")
def acquisitions(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    tmp = tmp_path_factory.mktemp("acquisitions")
    return {name: _acquire(tmp, name) for name in ACQUISITIONS}


def _centroids(data: np.ndarray, affine: np.ndarray) -> dict[int, np.ndarray]:
    """World centroid of each object, found by its intensity band."""
    out = {}
    for lab, (_, _, value) in OBJECTS.items():
        idx = np.argwhere(np.abs(data - value) < 50)
        assert len(idx), f"object {lab} not found"
        out[lab] = apply_affine(affine, idx).mean(axis=0)
    return out


def _check_world_positions(
    data: np.ndarray, affine: np.ndarray, true_affine: np.ndarray, true_labels: np.ndarray, what: str
) -> None:
    half_voxel = 0.5 * max(np.linalg.norm(true_affine[:3, :3], axis=0))
    found = _centroids(data, affine)
    for lab, (centre, _, _) in OBJECTS.items():
        on_grid = apply_affine(true_affine, np.argwhere(true_labels == lab)).mean(axis=0)
        np.testing.assert_allclose(found[lab], on_grid, atol=1e-3, err_msg=f"{what}: object {lab}")
        assert np.linalg.norm(found[lab] - centre) < half_voxel, f"{what}: object {lab}"


def read_series_independently(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A minimal DICOM reader: slices sorted along the normal, affine from IPP/IOP, LPS -> RAS."""
    slices = [pydicom.dcmread(p) for p in folder.iterdir()]
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))
    ipp = np.array([d.ImagePositionPatient for d in slices], dtype=float)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing  # i walks along a row: the first IOP vector
    lps[:3, 1] = iop[3:] * row_spacing  # j walks down a column: the second IOP vector
    lps[:3, 2] = (ipp[-1] - ipp[0]) / (len(slices) - 1)
    lps[:3, 3] = ipp[0]
    data = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices], axis=2)
    return data, LPS_TO_RAS @ lps


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_independent_reader_finds_objects_at_their_world_positions(acquisitions, name):
    folder, true_affine, true_labels = acquisitions[name]
    data, affine = read_series_independently(folder)
    _check_world_positions(data, affine, true_affine, true_labels, name)
    assert orientation_name(affine) == ACQUISITIONS[name][0]


@pytest.mark.skipif(dcm2niix_binary() is None, reason="dcm2niix is not installed (pip install dcm2niix)")
@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_dcm2niix_agrees_with_the_true_geometry(acquisitions, name, tmp_path):
    folder, true_affine, true_labels = acquisitions[name]
    subprocess.run(
        [dcm2niix_binary(), "-z", "n", "-b", "n", "-f", "out", "-o", str(tmp_path), str(folder)],
        check=True,
        capture_output=True,
    )
    (nii,) = tmp_path.glob("*.nii")
    theirs = nib.as_closest_canonical(nib.load(nii))
    truth = nib.as_closest_canonical(nib.Nifti1Image(true_labels.astype(np.float32), true_affine))
    np.testing.assert_allclose(theirs.affine, truth.affine, atol=0.01)
    _check_world_positions(theirs.get_fdata(), theirs.affine, truth.affine, np.asarray(truth.dataobj), name)


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_engine_loader_puts_objects_at_their_world_positions(acquisitions, name):
    import engine.discover as discover

    folder, true_affine, true_labels = acquisitions[name]
    result = discover.scan([folder])
    assert len(result.series) == 1, result.warnings
    volume = discover.load(result.series[0])
    _check_world_positions(volume.data, volume.affine, true_affine, true_labels, name)
    assert orientation_name(volume.affine) == ACQUISITIONS[name][0]
    ours = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(volume.shape, np.float32), volume.affine))
    truth = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(true_labels.shape, np.float32), true_affine))
    np.testing.assert_allclose(ours.affine, truth.affine, atol=0.01)


def test_engine_loader_matches_demo_archive_ground_truth(tmp_path):
    """Every demo series loads onto the grid of its ground-truth label map, voxel for voxel."""
    import engine.discover as discover

    manifest = write_demo_archive(tmp_path / "demo", studies=2, seed=11)
    result = discover.scan([manifest.dicom_root])
    assert not result.warnings
    assert sorted(ref.series_uid for ref in result.series) == sorted(s.series_uid for s in manifest.series)
    for ref in result.series:
        truth = manifest.series_by_uid(ref.series_uid)
        volume = discover.load(ref)
        labels = nib.load(manifest.root / truth.label_map)
        ours = nib.as_closest_canonical(nib.Nifti1Image(volume.data.astype(np.float32), volume.affine))
        gt = nib.as_closest_canonical(labels)
        np.testing.assert_allclose(ours.affine, gt.affine, atol=0.01)
        lab = np.asarray(gt.dataobj)
        body, background = ours.get_fdata()[lab == 1].mean(), ours.get_fdata()[lab == 0].mean()
        assert body > 5 * background, truth.series_key
