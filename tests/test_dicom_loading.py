"""DICOM loading: slice order, world geometry against dcm2niix, rescale, Enhanced multi-frame,
Siemens mosaic and compressed transfer syntaxes.

Synthetic series are written with pydicom inside the tests; the real validation sets in
../shared/data (dcm2niix's dcm_qa_ts and dcm_qa_enh) are used when present.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from engine.discover import load, scan
from engine.geometry import LPS_TO_RAS, apply_affine, corners, world_to_voxel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
AFFINE_TOL_MM = 0.01

# An oblique plane (rotated about two axes), in DICOM LPS direction cosines.
_a, _b = np.radians(20.0), np.radians(-12.0)
_rot = np.array([[1, 0, 0], [0, np.cos(_a), -np.sin(_a)], [0, np.sin(_a), np.cos(_a)]]) @ np.array(
    [[np.cos(_b), 0, np.sin(_b)], [0, 1, 0], [-np.sin(_b), 0, np.cos(_b)]]
)
OBLIQUE_IOP = tuple(float(v) for v in np.concatenate([_rot[:, 0], _rot[:, 1]]))
AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# --------------------------------------------------------------------------- synthetic DICOM


def slice_pixels(k: int, rows: int, cols: int) -> np.ndarray:
    """Stored values that identify the slice (k) and the pixel (row, column)."""
    r, c = np.mgrid[0:rows, 0:cols]
    return (1000 * (k + 1) + 10 * r + c).astype(np.uint16)


def mr_dataset(
    pixels: np.ndarray,
    *,
    ipp,
    iop=AXIAL_IOP,
    pixel_spacing=(0.9, 1.1),
    thickness: float = 2.5,
    study_uid: str,
    series_uid: str,
    instance: int = 1,
    modality: str = "MR",
    slope: float | None = None,
    intercept: float | None = None,
) -> Dataset:
    """A minimal, valid single-frame MR (or CT) Image Storage dataset."""
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = study_uid
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 5, instance
    ds.SeriesDescription = "synthetic"
    ds.PatientName, ds.PatientID = "Test^Synthetic", "SYN"
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.SliceThickness = f"{thickness:.6f}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope}", f"{intercept or 0}", "US"
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_series(
    folder: Path,
    *,
    shape=(16, 12, 10),
    iop=AXIAL_IOP,
    origin=(-20.0, -30.0, 15.0),
    step: float = 2.5,
    pixel_spacing=(0.9, 1.1),
    skip: tuple[int, ...] = (),
    shuffle: bool = True,
    modality: str = "MR",
    slope: float | None = None,
    intercept: float | None = None,
    seed: int = 0,
) -> dict:
    """Write one slice per file with random names and shuffled InstanceNumbers.

    ``shape`` is (rows, columns, slices). Returns the paths (in slice order), the UIDs and the
    expected voxel->RAS affine in the engine's convention (i along columns, j along rows).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = shape
    rng = random.Random(seed)
    row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row_cos, col_cos)
    study_uid, series_uid = generate_uid(), generate_uid()
    instances = list(range(1, n + 1))
    if shuffle:
        rng.shuffle(instances)
    paths: list[Path | None] = []
    for k in range(n):
        if k in skip:
            paths.append(None)
            continue
        ipp = np.asarray(origin) + k * step * normal
        ds = mr_dataset(
            slice_pixels(k, rows, cols),
            ipp=ipp,
            iop=iop,
            pixel_spacing=pixel_spacing,
            thickness=step,
            study_uid=study_uid,
            series_uid=series_uid,
            instance=instances[k],
            modality=modality,
            slope=slope,
            intercept=intercept,
        )
        name = f"{rng.getrandbits(40):010x}" if shuffle else f"IM{k:04d}"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]
    lps[:3, 1] = col_cos * pixel_spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = origin
    return {"paths": paths, "study_uid": study_uid, "series_uid": series_uid, "affine": LPS_TO_RAS @ lps}


def only_series(paths):
    result = scan(paths)
    assert len(result.series) == 1, (result.series, result.warnings)
    return result.series[0]


# --------------------------------------------------------------------------- references


def dcm2niix_binary() -> str | None:
    found = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    return found if Path(found).exists() else None


def run_dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    exe = dcm2niix_binary()
    if exe is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [exe, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(folder)], check=True, capture_output=True
    )
    niis = sorted(out.glob("*.nii"))
    assert niis, f"dcm2niix wrote nothing for {folder}"
    return nib.load(niis[0])


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine))
    return np.asarray(img.dataobj), img.affine


def world_difference_mm(shape, affine_a, affine_b) -> float:
    """Largest distance between the world positions both affines give the grid's corner voxels."""
    pts = corners(shape)
    return float(np.abs(apply_affine(affine_a, pts) - apply_affine(affine_b, pts)).max())


def assert_same_as_reference(vol, ref_data: np.ndarray, ref_affine: np.ndarray, *, scale: float = 1.0) -> None:
    ours, ours_aff = canonical(vol.data, vol.affine)
    theirs, theirs_aff = canonical(ref_data, ref_affine)
    assert ours.shape == theirs.shape
    assert world_difference_mm(ours.shape, ours_aff, theirs_aff) < AFFINE_TOL_MM
    np.testing.assert_allclose(ours, theirs * scale, rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------- classic series


def test_slices_are_ordered_by_position_not_by_name_or_instance_number(tmp_path):
    info = write_series(tmp_path / "s", shuffle=True)
    vol = load(only_series([tmp_path]))
    assert vol.shape == (12, 16, 10)  # (columns, rows, slices)
    for k in range(10):
        np.testing.assert_array_equal(vol.data[:, :, k], slice_pixels(k, 16, 12).T)
    np.testing.assert_allclose(vol.affine, info["affine"], atol=1e-4)


def test_descending_positions_still_give_correct_world_coordinates(tmp_path):
    info = write_series(tmp_path / "s", step=-3.0)
    vol = load(only_series([tmp_path]))
    for k in range(10):  # file k's slice, found through world coordinates
        world = apply_affine(info["affine"], [[0, 0, k]])
        idx = world_to_voxel(vol.affine, world)[0]
        np.testing.assert_allclose(idx[:2], 0, atol=1e-4)
        np.testing.assert_array_equal(vol.data[:, :, round(idx[2])], slice_pixels(k, 16, 12).T)


def test_rescale_slope_and_intercept_give_float32_values(tmp_path):
    write_series(tmp_path / "s", slope=0.5, intercept=-100.0)
    vol = load(only_series([tmp_path]))
    assert vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data[:, :, 3], slice_pixels(3, 16, 12).T * 0.5 - 100.0)


def test_oblique_series_matches_dcm2niix(tmp_path):
    info = write_series(tmp_path / "dcm", iop=OBLIQUE_IOP, step=3.0, slope=2.0, intercept=5.0, shuffle=True)
    ref = run_dcm2niix(tmp_path / "dcm", tmp_path / "nii")
    ref_data = np.asarray(ref.dataobj, dtype=np.float32)
    ref = nib.Nifti1Image(ref_data, ref.affine)
    vol = load(only_series([tmp_path / "dcm"]))
    assert vol.orientation == "oblique"
    np.testing.assert_allclose(vol.affine, info["affine"], atol=1e-4)
    assert_same_as_reference(vol, np.asarray(ref.dataobj), ref.affine)


def test_pydicom_mr_small_matches_dcm2niix(tmp_path):
    src = Path(get_testdata_file("MR_small.dcm"))
    folder = tmp_path / "dcm"
    folder.mkdir()
    shutil.copy(src, folder / "image")
    ref = run_dcm2niix(folder, tmp_path / "nii")
    vol = load(only_series([folder]))
    ref_data = np.asarray(ref.dataobj, dtype=np.float32).reshape(vol.shape)
    assert_same_as_reference(vol, ref_data, ref.affine)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"]
)
def test_pydicom_compressed_variants_load_like_uncompressed(tmp_path, name):
    base = load(only_series([get_testdata_file("MR_small.dcm")]))
    other = load(only_series([get_testdata_file(name)]))
    np.testing.assert_array_equal(other.data, base.data)
    np.testing.assert_allclose(other.affine, base.affine)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_synthetic_compressed_series_equals_uncompressed(tmp_path, syntax):
    plain = write_series(tmp_path / "plain", shape=(64, 48, 4), shuffle=False, seed=3)  # J2K needs >= 32 px
    packed_dir = tmp_path / "packed"
    packed_dir.mkdir()
    packed_uid = generate_uid()
    for i, path in enumerate(plain["paths"]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = packed_uid
        ds.compress(syntax)
        ds.save_as(packed_dir / f"r{i}", enforce_file_format=True)
    a = load(only_series([tmp_path / "plain"]))
    ref = only_series([packed_dir])
    assert ref.meta["transfer_syntax"] == syntax
    b = load(ref)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine)


# --------------------------------------------------------------------------- Enhanced multi-frame


def write_enhanced(
    path: Path, *, shape=(8, 10, 5), n_times: int = 2, iop=OBLIQUE_IOP, step=2.0, origin=(10.0, -5.0, 30.0)
) -> dict:
    """An Enhanced MR Image Storage object with ``n_times`` temporal positions, frames shuffled.

    Time point t of slice k stores ``slice_pixels(k) + 100 * t``; each frame has its own rescale.
    """
    rows, cols, n = shape
    row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row_cos, col_cos)
    order = [(t, k) for t in range(n_times) for k in range(n)]
    random.Random(1).shuffle(order)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 7, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, len(order)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures = Dataset()
    measures.PixelSpacing = ["1.5", "0.75"]
    measures.SliceThickness = str(step)
    orientation = Dataset()
    orientation.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    dims = []
    for pointer in (0x00209128, 0x00209057):  # TemporalPositionIndex, InStackPositionNumber
        item = Dataset()
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = 0x00209111
        dims.append(item)
    ds.DimensionIndexSequence = Sequence(dims)
    frames, planes = [], []
    for t, k in order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * step * normal]
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.TemporalPositionIndex = t + 1
        content.DimensionIndexValues = [t + 1, k + 1]
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = f"{1 + k}", "0", "US"
        item.PlanePositionSequence = Sequence([pos])
        item.FrameContentSequence = Sequence([content])
        item.PixelValueTransformationSequence = Sequence([pvt])
        frames.append(item)
        planes.append(slice_pixels(k, rows, cols) + 100 * t)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(planes).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * 0.75, col_cos * 1.5, normal * step, origin
    return {"affine": LPS_TO_RAS @ lps, "shape": shape}


def test_synthetic_enhanced_mr_loads_first_time_point_with_per_frame_rescale(tmp_path):
    info = write_enhanced(tmp_path / "enh.dcm")
    ref = only_series([tmp_path])
    assert ref.meta["multiframe"] and ref.meta["volumes"] == 2 and ref.dims == (10, 8, 5)
    vol = load(ref)
    np.testing.assert_allclose(vol.affine, info["affine"], atol=1e-4)
    for k in range(5):
        np.testing.assert_allclose(vol.data[:, :, k], slice_pixels(k, 8, 10).T * (1 + k))
    assert "first volume" in vol.meta["volume_rule"]


def test_synthetic_enhanced_mr_matches_dcm2niix_first_volume(tmp_path):
    (tmp_path / "dcm").mkdir()
    write_enhanced(tmp_path / "dcm" / "enh.dcm")
    ref = run_dcm2niix(tmp_path / "dcm", tmp_path / "nii")
    ref_data = np.asarray(ref.dataobj, dtype=np.float32)
    vol = load(only_series([tmp_path / "dcm"]))
    assert_same_as_reference(vol, ref_data[..., 0] if ref_data.ndim == 4 else ref_data, ref.affine)


# --------------------------------------------------------------------------- real data (dcm2niix QA sets)

needs_ts = pytest.mark.skipif(not (SHARED / "dcm_qa_ts").is_dir(), reason="../shared/data/dcm_qa_ts is absent")
needs_enh = pytest.mark.skipif(not (SHARED / "dcm_qa_enh").is_dir(), reason="../shared/data/dcm_qa_enh is absent")


@needs_ts
@pytest.mark.parametrize("number", range(1, 10))
def test_mosaic_in_every_transfer_syntax_matches_dcm2niix(number):
    ref = only_series([SHARED / "dcm_qa_ts" / "In" / f"{number}.dcm"])
    assert ref.meta["mosaic"] and ref.dims == (64, 64, 35) and ref.orientation == "axial"
    vol = load(ref)
    nii = nib.load(SHARED / "dcm_qa_ts" / "Ref" / f"{number}.nii")
    assert_same_as_reference(vol, np.asarray(nii.dataobj, dtype=np.float32), nii.affine)


@needs_ts
def test_transfer_syntax_copies_are_separate_series_with_identical_volumes():
    result = scan([SHARED / "dcm_qa_ts" / "In"])
    assert len(result.series) == 9 and not any(s.problems for s in result.series)
    syntaxes = {s.meta["transfer_syntax"] for s in result.series}
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"} <= syntaxes  # RLE, JPEG 2000
    first = load(result.series[0])
    for ref in result.series[1:]:
        np.testing.assert_array_equal(load(ref).data, first.data)


@needs_enh
def test_philips_enhanced_field_map_first_volume_matches_dcm2niix():
    ref = only_series([SHARED / "dcm_qa_enh" / "In" / "Philips"])
    assert ref.meta["volumes"] == 2 and ref.dims == (64, 64, 32)
    vol = load(ref)
    nii = nib.load(SHARED / "dcm_qa_enh" / "Ref" / "Philips_WIP_B0_NS_801_e1.nii")
    # dcm2niix keeps Philips' private floating-point scale in the header; compare stored values
    stored = np.asarray(nii.dataobj.get_unscaled(), dtype=np.float32)
    slope = float(
        pydicom.dcmread(ref.sources[0].path, stop_before_pixels=True)
        .PerFrameFunctionalGroupsSequence[0]
        .PixelValueTransformationSequence[0]
        .RescaleSlope
    )
    assert_same_as_reference(vol, stored, nii.affine, scale=slope)


@needs_enh
def test_siemens_xa10_multi_file_run_loads_first_time_point_like_dcm2niix():
    ref = only_series([SHARED / "dcm_qa_enh" / "In" / "Siemens"])
    assert ref.meta["volumes"] == 4 and len(ref.sources) == 4
    vol = load(ref)
    nii = nib.load(SHARED / "dcm_qa_enh" / "Ref" / "Siemens_REST1_w_SMS_PF7-8_6.nii")
    assert_same_as_reference(vol, np.asarray(nii.dataobj, dtype=np.float32)[..., 0], nii.affine)


# --------------------------------------------------------------------------- one parse per file


@pytest.fixture
def header_reads(monkeypatch):
    """Counts every header parse (pydicom.dcmread, the lean reader's read_partial, and the
    raw-element reader when it reads the header), per file."""
    import pydicom.filereader

    from engine.dicom import frames

    counts: dict[str, int] = {}

    def counting(fn):
        def wrapper(fp, *args, **kwargs):
            name = Path(getattr(fp, "name", str(fp))).name
            counts[name] = counts.get(name, 0) + 1
            return fn(fp, *args, **kwargs)

        return wrapper

    def counting_lean(fn):
        def wrapper(fp):
            ds = fn(fp)
            if ds is not None:  # None: nothing kept, pydicom reads the header instead
                name = Path(getattr(fp, "name", str(fp))).name
                counts[name] = counts.get(name, 0) + 1
            return ds

        return wrapper

    monkeypatch.setattr(frames, "read_partial", counting(pydicom.filereader.read_partial))
    monkeypatch.setattr(frames, "_lean_partial", counting_lean(frames._lean_partial))
    monkeypatch.setattr(pydicom, "dcmread", counting(pydicom.dcmread))
    return counts


def test_classic_series_header_is_parsed_once_per_file_over_scan_and_load(tmp_path, header_reads):
    info = write_series(tmp_path / "s", shape=(16, 12, 10), slope=2.0, intercept=-5.0)
    vol = load(only_series([tmp_path / "s"]))
    assert sorted(header_reads) == sorted(p.name for p in info["paths"])
    assert set(header_reads.values()) == {1}
    np.testing.assert_allclose(vol.data[:, :, 3], slice_pixels(3, 16, 12).T * 2.0 - 5.0)


def test_enhanced_file_is_parsed_once_over_scan_and_load(tmp_path, header_reads):
    write_enhanced(tmp_path / "enh.dcm")
    load(only_series([tmp_path]))
    assert header_reads == {"enh.dcm": 1}


@needs_enh
@pytest.mark.parametrize("folder", ["Philips", "Siemens/XA10"])
def test_vendor_enhanced_files_are_parsed_once_and_pickle_small(folder, header_reads):
    import pickle

    ref = only_series([SHARED / "dcm_qa_enh" / "In" / folder])
    load(ref)
    assert set(header_reads.values()) == {1} and len(header_reads) == len(ref.sources)
    assert len(pickle.dumps(ref)) < 64 * 1024  # sent to worker processes


@needs_enh
@pytest.mark.parametrize("folder", ["Philips", "Siemens/XA10"])
def test_lean_functional_groups_equal_pydicom(folder):
    from engine.dicom.frames import _enhanced_frames, read_file_header
    from engine.discover import Source

    for path in sorted((SHARED / "dcm_qa_enh" / "In" / folder).glob("*.dcm")):
        source = Source(path, label=path.name)
        ds, _, groups, _ = read_file_header(source)
        assert groups is not None, "the lean reader fell back to pydicom"
        assert _enhanced_frames(ds, source, groups) == _enhanced_frames(
            pydicom.dcmread(path, stop_before_pixels=True), source
        )


@needs_ts
@pytest.mark.parametrize("number", [1, 3, 4, 9])
def test_mosaic_is_parsed_once_in_every_syntax(number, header_reads):
    load(only_series([SHARED / "dcm_qa_ts" / "In" / f"{number}.dcm"]))
    assert header_reads == {f"{number}.dcm": 1}
