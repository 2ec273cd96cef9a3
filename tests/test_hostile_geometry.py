"""Hostile geometry: every bad header fails its own series with a typed error naming the file and
the rule, never the run; real-world jitter and variable spacing load with correct world
geometry; identifiers in free text never leave the loader."""

from __future__ import annotations

import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from engine.dicom import load_series
from engine.dicom.stack import GRID_TOL, StackError
from engine.discover import LoadError, load, scan
from engine.errors import GeometryError, InputError
from engine.geometry import LPS_TO_RAS, apply_affine
from engine.nifti import NiftiReader
from engine.prepare import prepare
from engine.synthetic.dicom_writer import Patient, derive_uid, write_dicom_series

PRE = {
    "orientation": "RAS",
    "spacing": [3.0, 3.0, 3.0],
    "input_size": [32, 32, 32],
    "intensity": {"clip_percentiles": [0.5, 99.5], "normalize": "zscore"},
    "tile_overlap": 0.25,
}

# an oblique plane (rotated about two axes); columns are the RAS directions of i, j, k
_a, _b = np.radians(20.0), np.radians(-12.0)
ROT = np.array([[1, 0, 0], [0, np.cos(_a), -np.sin(_a)], [0, np.sin(_a), np.cos(_a)]]) @ np.array(
    [[np.cos(_b), 0, np.sin(_b)], [0, 1, 0], [-np.sin(_b), 0, np.cos(_b)]]
)


def oblique_affine(step: float = 7.0, pixel: tuple[float, float] = (0.9, 1.1)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = ROT @ np.diag([pixel[0], pixel[1], step])
    affine[:3, 3] = [-40.0, 25.0, -10.0]
    return affine


def write(folder: Path, data: np.ndarray, affine: np.ndarray, **kwargs) -> list[Path]:
    uid = derive_uid(str(folder))
    return write_dicom_series(folder, data, affine, study_uid=uid + ".1", series_uid=uid + ".2", **kwargs)


def patch(paths: list[Path], each=None, **tags) -> None:
    """Rewrite headers in place: ``tags`` for every file, ``each(k, ds)`` per file."""
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        for name, value in tags.items():
            setattr(ds, name, value)
        if each is not None:
            each(k, ds)
        ds.save_as(path, enforce_file_format=True)


def ramp(shape=(12, 10, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.float64)


def only(paths) -> object:
    [ref] = scan(paths).series
    return ref


def ipp_ras(path: Path) -> np.ndarray:
    return LPS_TO_RAS[:3, :3] @ np.array([float(v) for v in pydicom.dcmread(path).ImagePositionPatient])


def assert_refused(ref, error_type, *words) -> str:
    """Scan reports it, the reader raises exactly ``error_type``, load raises an InputError and
    prepare() returns (never raises) an error without an affine; every message names a file of
    the series by its label."""
    labels = [str(s) for s in ref.sources]
    reader = load_series if ref.reader == "dicom" else NiftiReader().load
    with pytest.raises(InputError) as caught:
        reader(ref)
    assert type(caught.value) is error_type, caught.value
    message = str(caught.value)
    assert any(label in message for label in labels), message
    for word in words:
        assert word in message, (word, message)
    with pytest.raises(InputError, match="|".join(map(re.escape, words))):
        load(ref)
    prep = prepare(ref, PRE, ("global",))
    assert prep.error and prep.affine is None and not prep.views
    assert any(label in prep.error for label in labels) and all(w in prep.error for w in words), prep.error
    assert "ITK" not in prep.error and "Traceback" not in prep.error
    return message


# --------------------------------------------------------------------------- NIfTI headers


def hostile_nifti(path: Path, **fields) -> None:
    """A valid NIfTI whose stored header fields are then overwritten (nibabel would refuse or
    repair them when writing)."""
    data = np.random.default_rng(1).random((10, 9, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    raw = bytearray(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    for name, value in fields.items():
        hdr[name] = value
    raw[: len(hdr.binaryblock)] = hdr.binaryblock
    path.write_bytes(bytes(raw))


NAN, INF = float("nan"), float("inf")
NIFTI_CASES = {
    "nan_sform": (dict(srow_x=[NAN] * 4, sform_code=1), "sform"),
    "inf_sform": (dict(srow_y=[0, INF, 0, 0], sform_code=1), "sform"),
    "coplanar_sform": (dict(srow_x=[2.0, 0.0, 2.0, 0.0], srow_z=[0.0, 0.0, 0.0, 0.0], sform_code=1), "singular"),
    "zero_column_sform": (dict(srow_z=[0.0, 0.0, 0.0, 0.0], sform_code=1), "voxel size along axis 2"),
    "nan_qform": (dict(sform_code=0, qform_code=1, quatern_b=NAN), "qform"),
    "zero_pixdim": (dict(sform_code=0, qform_code=1, pixdim=[1, 2, 0, 3, 1, 1, 1, 1]), "pixdim"),
    "negative_pixdim": (dict(sform_code=0, qform_code=1, pixdim=[1, 2, -2, 3, 1, 1, 1, 1]), "pixdim"),
    "nan_pixdim": (dict(sform_code=0, qform_code=0, pixdim=[1, 2, NAN, 3, 1, 1, 1, 1]), "pixdim"),
}


@pytest.mark.parametrize("case", sorted(NIFTI_CASES))
def test_hostile_nifti_geometry_fails_only_its_series(tmp_path, case):
    fields, rule = NIFTI_CASES[case]
    hostile_nifti(tmp_path / f"{case}.nii", **fields)
    good = np.random.default_rng(2).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(good, np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / "good.nii")
    refs = scan([tmp_path]).series
    bad = next(r for r in refs if r.problems)
    ok = next(r for r in refs if not r.problems)
    assert any(str(bad.sources[0]) in p and rule in p for p in bad.problems) and bad.orientation == "unknown"
    assert_refused(bad, GeometryError, rule)
    prep = prepare(ok, PRE, ("global",))
    assert prep.error is None and np.isfinite(prep.affine).all() and abs(np.linalg.det(prep.affine)) > 1


def test_every_prepared_affine_is_finite_and_invertible(tmp_path):
    data = np.random.default_rng(3).random((9, 8, 7)).astype(np.float32)
    nib.save(
        nib.Nifti1Image(data, np.array([[0, 0, 2.0, 5], [1.2, 0, 0, -3], [0, 1.1, 0, 9], [0, 0, 0, 1]])),
        tmp_path / "a.nii",
    )
    prep = prepare(only([tmp_path]), PRE, ("global", "tiles"))
    assert prep.error is None
    np.testing.assert_allclose(np.linalg.inv(prep.affine) @ prep.affine, np.eye(4), atol=1e-12)
    assert nib.aff2axcodes(prep.affine) == ("A", "S", "R")


# --------------------------------------------------------------------------- DICOM orientation and spacing


def _unit_iop() -> list[float]:
    lps = LPS_TO_RAS[:3, :3] @ ROT
    return [*lps[:, 0], *lps[:, 1]]


def test_non_orthogonal_orientation_is_named_not_a_duplicate_position(tmp_path):
    paths = write(tmp_path / "s", ramp(), oblique_affine())
    iop = _unit_iop()
    row, col = np.array(iop[:3]), np.array(iop[3:])
    skewed = np.cos(np.radians(5.0)) * col + np.sin(np.radians(5.0)) * row  # 85 degrees from the row
    patch(paths, ImageOrientationPatient=[f"{v:.8f}" for v in (*row, *skewed)])
    message = assert_refused(only([tmp_path / "s"]), StackError, "not orthogonal")
    assert "angle 85.00°" in message and "duplicate" not in message


@pytest.mark.parametrize("scale", [1.004, 0.995])
def test_near_unit_orientation_is_renormalised_to_the_same_affine(tmp_path, scale):
    data, affine = ramp(), oblique_affine()
    write(tmp_path / "unit", data, affine)
    paths = write(tmp_path / "scaled", data, affine)
    patch(paths, ImageOrientationPatient=[f"{v * scale:.8f}" for v in _unit_iop()])
    unit, scaled = load(only([tmp_path / "unit"])), load(only([tmp_path / "scaled"]))
    np.testing.assert_allclose(scaled.affine, unit.affine, atol=1e-5)
    np.testing.assert_allclose(unit.affine, affine, atol=1e-4)
    assert "renormalised" in scaled.meta["orientation_rule"] and "orientation_rule" not in unit.meta


def test_orientation_far_from_unit_length_is_refused(tmp_path):
    paths = write(tmp_path / "s", ramp(), oblique_affine())
    patch(paths, ImageOrientationPatient=[f"{v * 1.05:.8f}" for v in _unit_iop()])
    assert_refused(only([tmp_path / "s"]), StackError, "row vector has length 1.0500")


@pytest.mark.parametrize("spacing", [["0", "1.1"], ["-0.9", "1.1"], ["nan", "1.1"]])
def test_bad_pixel_spacing_is_refused(tmp_path, spacing):
    paths = write(tmp_path / "s", ramp(), oblique_affine())
    patch(paths, PixelSpacing=spacing)
    assert_refused(only([tmp_path / "s"]), StackError, "PixelSpacing", "not two positive numbers")


def test_nan_orientation_is_refused(tmp_path):
    paths = write(tmp_path / "s", ramp(), oblique_affine())
    patch(paths, ImageOrientationPatient=["nan", "0", "0", "0", "1", "0"])
    assert_refused(only([tmp_path / "s"]), StackError, "ImageOrientationPatient holds non-finite")


def test_rows_smaller_than_the_pixel_data_are_named(tmp_path):
    paths = write(tmp_path / "s", ramp((12, 10, 4)), np.diag([1.0, 1.0, 2.0, 1.0]))
    patch(paths, Rows=5)  # the data holds 10 rows
    ref = only([tmp_path / "s"])
    message = assert_refused(ref, LoadError, "pixel data holds 240 bytes")
    assert "Rows x Columns x frames x bytes/pixel (5 x 12 x 1 x 2) needs 120" in message


def test_rows_larger_than_the_pixel_data_are_named_at_scan(tmp_path):
    paths = write(tmp_path / "s", ramp((12, 10, 4)), np.diag([1.0, 1.0, 2.0, 1.0]))
    patch(paths, Rows=40)
    ref = only([tmp_path / "s"])
    rule = "pixel data holds 240 bytes, Rows x Columns x frames x bytes/pixel (40 x 12 x 1 x 2) needs 960"
    assert any(p.startswith(str(ref.sources[0])) and p.endswith(rule) for p in ref.problems), ref.problems
    prep = prepare(ref, PRE, ("global",))
    assert prep.error and rule in prep.error and prep.affine is None


def test_a_cut_file_is_called_truncated(tmp_path):
    paths = write(tmp_path / "s", ramp((12, 10, 4)), np.diag([1.0, 1.0, 2.0, 1.0]))
    paths[2].write_bytes(paths[2].read_bytes()[:-100])
    ref = only([tmp_path / "s"])
    assert any(
        "truncated file: 140 bytes of pixel data, the Pixel Data element declares 240" in p for p in ref.problems
    )


# --------------------------------------------------------------------------- slice positions


def _jitter(seed: int, n: int, amplitude: float) -> np.ndarray:
    e = np.random.default_rng(seed).uniform(-amplitude, amplitude, n)
    e[0] = e[-1] = amplitude  # the first/last construction is then off by up to twice the jitter
    e[n // 2] = -amplitude
    return e


def test_jittered_oblique_positions_load_with_slice_centres_on_their_positions(tmp_path):
    n, step = 20, 7.0
    affine = oblique_affine(step)
    data = ramp((12, 10, n))
    jitter = _jitter(5, n, 0.01 * step)  # +-1 % of the step, along the normal
    normal_lps = LPS_TO_RAS[:3, :3] @ ROT[:, 2]

    def shift(k, ds):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient]) + jitter[k] * normal_lps
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]

    paths = write(tmp_path / "s", data, affine)
    patch(paths, each=shift)
    vol = load(only([tmp_path / "s"]))
    assert vol.shape == (12, 10, n)
    centres = apply_affine(vol.affine, [[0, 0, k] for k in range(n)])
    distance = np.linalg.norm(centres - np.array([ipp_ras(p) for p in paths]), axis=1)
    assert distance.max() < 0.1, distance
    # the construction from the first and last slice alone misses this bound
    first, last = ipp_ras(paths[0]), ipp_ras(paths[-1])
    naive = first + np.outer(np.arange(n), (last - first) / (n - 1))
    assert np.linalg.norm(naive - [ipp_ras(p) for p in paths], axis=1).max() > 0.1
    np.testing.assert_allclose(vol.data, data, atol=0.5)
    assert "least-squares" in vol.meta["slice_rule"]
    assert 0.05 < vol.meta["slice_fit_max_residual_mm"] < 0.1


def test_positions_beyond_the_grid_tolerance_are_resampled(tmp_path):
    step = 5.0
    paths = write(tmp_path / "s", ramp((12, 10, 8)), np.diag([1.0, 1.0, step, 1.0]))

    def shift(k, ds):
        if k == 4:  # 2.5 tolerances off the grid
            ds.ImagePositionPatient = [
                ds.ImagePositionPatient[0],
                ds.ImagePositionPatient[1],
                f"{float(ds.ImagePositionPatient[2]) + 2.5 * GRID_TOL * step:.4f}",
            ]

    patch(paths, each=shift)
    vol = load(only([tmp_path / "s"]))
    assert "resampled along the slice normal" in vol.meta["slice_rule"]


def test_variable_spacing_is_resampled_onto_a_regular_grid(tmp_path):
    z = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 13.0, 18.0, 23.0])  # 2 mm steps, then 5 mm
    data = ramp((12, 10, len(z)), seed=7)
    affine = oblique_affine(1.0)
    paths = write(tmp_path / "s", data, affine)
    normal_lps = LPS_TO_RAS[:3, :3] @ ROT[:, 2]
    origin_lps = LPS_TO_RAS[:3, :3] @ affine[:3, 3]
    patch(
        paths,
        each=lambda k, ds: setattr(ds, "ImagePositionPatient", [f"{v:.6f}" for v in origin_lps + z[k] * normal_lps]),
    )
    ref = only([tmp_path / "s"])
    assert not ref.problems and ref.dims == (12, 10, 12)
    vol = load(ref)
    assert vol.shape == (12, 10, 12)
    assert vol.meta["slice_rule"] == (
        "resampled along the slice normal from variable spacing (steps 2.000–5.000 mm) onto 12 slices of 2.000 mm"
    )
    targets = np.arange(12) * 2.0
    expected = np.apply_along_axis(lambda v: np.interp(targets, z, v), 2, data)
    np.testing.assert_allclose(vol.data, expected, atol=1e-3)
    # world geometry: output slice j sits 2j mm along the normal from the first slice
    centres = apply_affine(vol.affine, [[0, 0, j] for j in range(12)])
    np.testing.assert_allclose(centres, affine[:3, 3] + np.outer(targets, ROT[:, 2]), atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, :2], affine[:3, :2], atol=1e-6)


def test_a_missing_slice_is_still_reported_as_missing(tmp_path):
    paths = write(tmp_path / "s", ramp((12, 10, 8)), oblique_affine(4.0))
    paths[3].unlink()
    assert_refused(only([tmp_path / "s"]), StackError, "missing slice(s)", "1 missing between")


def test_sheared_stack_is_refused_with_a_plain_reason(tmp_path):
    paths = write(tmp_path / "s", ramp((12, 10, 6)), np.diag([1.0, 1.0, 5.0, 1.0]))

    def tilt(k, ds):  # 1 mm per 5 mm slice: an 11 degree gantry-style tilt
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y + k * 1.0:.4f}", f"{z:.4f}"]

    patch(paths, each=tilt)
    assert_refused(only([tmp_path / "s"]), StackError, "sheared slice stack", "11.31°")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_few_slice_series_load_and_give_views(tmp_path, n):
    paths = write(tmp_path / "s", ramp((40, 36, n)), oblique_affine(6.0), slice_thickness=4.0)
    if n == 1:
        patch(paths, SpacingBetweenSlices="6.5")
    ref = only([tmp_path / "s"])
    vol = load(ref)
    assert vol.shape == (40, 36, n)
    expected_k = 6.5 if n == 1 else 6.0
    np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, 2]), expected_k, atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, 2] / expected_k, ROT[:, 2], atol=1e-6)
    prep = prepare(ref, PRE, ("global", "tiles"))
    assert prep.error is None, prep.error
    view = prep.views["global"].image
    assert view.shape[-3:] == (32, 32, 32) and np.isfinite(view.numpy()).all() and float(view.std()) > 0


def test_view_failures_become_a_plain_reason(tmp_path, monkeypatch):
    import engine.views as views

    def broken(*args, **kwargs):
        raise RuntimeError(
            "Exception thrown in SimpleITK Execute: /tmp/SimpleITK-build/ITK/itkFilter.hxx:214:\n"
            "ITK ERROR: SmoothingRecursiveGaussianImageFilter(0x55d0): The grid is too small."
        )

    monkeypatch.setattr(views, "_resample", broken)
    write(tmp_path / "s", ramp(), oblique_affine())
    ref = only([tmp_path / "s"])
    prep = prepare(ref, PRE, ("global",))
    assert prep.error == (
        f"{ref.sources[0]}: could not resample the series into the encoder views (RuntimeError: The grid is too small.)"
    )


# --------------------------------------------------------------------------- identifiers


def test_identifiers_are_scrubbed_from_descriptions_and_meta_has_no_paths(tmp_path):
    patient = Patient(name="Doe^Johnathan", id="PID48213", birth_date="19800115")
    description = "doe johnathan BRAIN 15.01.1980 pid48213 1980-01-15 AX T1 Johnathan"
    write(
        tmp_path / "s",
        ramp(),
        oblique_affine(),
        patient=patient,
        description=description,
        extra_tags={"BodyPartExamined": "HEAD DOE JOHNATHAN"},
    )
    ref = only([tmp_path / "s"])
    assert ref.description == "[removed] BRAIN [removed] [removed] [removed] AX T1 [removed]"
    vol = load(ref)
    text = repr(vol.meta).lower()
    for secret in ("doe", "johnathan", "pid48213", "1980", str(tmp_path).lower()):
        assert secret not in text and secret not in ref.description.lower()
    assert "source" not in vol.meta and "patient_age" not in vol.meta


def test_short_name_parts_are_removed_only_as_whole_words(tmp_path):
    """A name part of three letters or fewer is removed only where the full name appears too:
    alone it is more likely a word of the protocol than the patient."""
    patient = Patient(name="Li^Al", id="77", birth_date="")
    write(tmp_path / "s", ramp(), oblique_affine(), patient=patient, description="OBLIQUE li AX T2 al 770")
    assert only([tmp_path / "s"]).description == "OBLIQUE li AX T2 al 770"
    write(tmp_path / "t", ramp(), oblique_affine(), patient=patient, description="Li Al OBLIQUE li AX T2 al 770")
    assert only([tmp_path / "t"]).description == "[removed] OBLIQUE [removed] AX T2 [removed] 770"
