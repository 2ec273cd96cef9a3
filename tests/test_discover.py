"""Discovery: DICOM found by content in folders and zips, junk reported, bad series flagged at
scan time and refused at load with a reason that names the file."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from engine.errors import InputError
from engine.discover import ScanResult, SeriesRef, Source, load, scan
from engine.plugins import get_readers

# The synthetic series builder lives with the loading tests (tests/ is on sys.path under pytest).
from test_dicom_loading import OBLIQUE_IOP, slice_pixels, write_series


def _junk(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "text": folder / "notes.txt",
        "random": folder / "blob",
        "empty": folder / "empty",
        "fake_dcm": folder / "fake.dcm",
        "hidden": folder / ".DS_Store",
    }
    files["text"].write_text("not an image\n")
    files["random"].write_bytes(np.random.default_rng(0).bytes(700))
    files["empty"].write_bytes(b"")
    files["fake_dcm"].write_text("looks like DICOM by name only")
    files["hidden"].write_bytes(b"\x00\x01")
    return files


def _label(result: ScanResult, path: Path | str) -> str:
    """The label ``scan`` gave ``path`` (messages name files by label, never by path)."""
    [label] = [k for k, v in result.locations.items() if v == str(path)]
    return label


def _names(text: str, label: str) -> bool:
    return re.search(re.escape(label) + r"(?![#\d])", text) is not None


def _warning_for(result: ScanResult, path: Path | str) -> str:
    label = _label(result, path)
    hits = [w for w in result.warnings if w.startswith(f"{label}: ")]
    assert len(hits) == 1, (path, label, result.warnings)
    return hits[0]


def test_readers_are_registered_through_the_plugin_manager():
    readers = get_readers()
    assert {"dicom", "nifti"} <= set(readers)
    assert readers["dicom"].plugin == "plugins.readers"


def test_dicom_is_found_by_content_with_junk_reported_not_fatal(tmp_path):
    info = write_series(tmp_path / "a" / "b" / "deep", shape=(16, 16, 10))  # files without extension
    junk = _junk(tmp_path / "a")
    result = scan([tmp_path])
    assert len(result.series) == 1
    ref = result.series[0]
    assert ref.reader == "dicom" and ref.series_uid == info["series_uid"] and ref.problems == []
    assert ref.dims == (16, 16, 10) and ref.n_slices == 10 and ref.orientation == "axial"
    assert len(ref.sources) == 10
    for kind in ("text", "random", "fake_dcm"):
        assert "not a DICOM or NIfTI" in _warning_for(result, junk[kind])
    assert "empty" in _warning_for(result, junk["empty"])
    assert not any(".DS_Store" in w for w in result.warnings)
    assert result.skipped_counts() == {"empty": 1, "hidden": 1, "unrecognised": 3}


def test_series_inside_a_zip_is_scanned_and_loaded_without_extracting(tmp_path):
    info = write_series(tmp_path / "src", shape=(16, 16, 10), iop=OBLIQUE_IOP)
    junk = _junk(tmp_path / "junk")
    archive = tmp_path / "in" / "study.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for i, path in enumerate(info["paths"]):
            zf.write(path, f"patient/study/series/{path.name}")
        zf.write(junk["text"], "patient/README.txt")
    result = scan([tmp_path / "in"])
    [ref] = result.series
    assert all(s.path == archive and s.member.startswith("patient/") for s in ref.sources)
    assert str(ref.sources[0]).startswith("in#1#") and "patient" not in str(ref.sources[0])
    assert ref.sources[0].path_text.startswith(f"{archive}!patient/study/series/")
    assert "not a DICOM" in _warning_for(result, f"{archive}!patient/README.txt")
    vol = load(ref)
    np.testing.assert_allclose(vol.affine, info["affine"], atol=1e-4)
    np.testing.assert_array_equal(vol.data[:, :, 7], slice_pixels(7, 16, 16).T)
    assert vol.orientation == "oblique" and ref.orientation == "oblique"
    assert Source(archive, ref.sources[0].member).read_bytes()[128:132] == b"DICM"


def test_scan_results_pickle_for_worker_processes(tmp_path):
    write_series(tmp_path / "s", shape=(8, 8, 4))
    result = scan([tmp_path])
    again = pickle.loads(pickle.dumps(result))
    assert isinstance(again.series[0], SeriesRef) and again.series[0].sources == result.series[0].sources
    assert load(again.series[0]).shape == (8, 8, 4)


def test_two_series_in_one_folder_are_grouped_by_uid(tmp_path):
    a = write_series(tmp_path / "x", shape=(8, 8, 4), seed=1)
    b = write_series(tmp_path / "x", shape=(8, 8, 6), seed=2)
    result = scan([tmp_path])
    by_uid = {s.series_uid: s for s in result.series}
    assert by_uid[a["series_uid"]].n_slices == 4 and by_uid[b["series_uid"]].n_slices == 6
    assert all(s.key.replace(".", "").isdigit() for s in result.series)


# --------------------------------------------------------------------------- bad input


def _assert_refused(ref: SeriesRef, problem: str, paths: list[Path]) -> None:
    """A scan-time problem naming every one of ``paths`` by label; an InputError naming one."""
    labels = {str(s): s for s in ref.sources}
    names = [next(k for k, s in labels.items() if s.path_text == str(p)) for p in paths]
    text = " ".join(ref.problems)
    assert problem in text and all(_names(text, n) for n in names), (names, ref.problems)
    with pytest.raises(InputError) as err:
        load(ref)
    assert problem in str(err.value) and any(_names(str(err.value), n) for n in names), str(err.value)
    assert not any(p.name in str(err.value) or p.name in text for p in paths)


def test_truncated_file_is_flagged_and_refused_with_its_name(tmp_path):
    info = write_series(tmp_path / "s", shape=(64, 64, 10))
    victim = info["paths"][4]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # cut in half: header intact, pixels short
    [ref] = scan([tmp_path]).series
    _assert_refused(ref, "truncated", [victim])


def test_file_cut_inside_its_header_is_a_warning_and_leaves_a_gap(tmp_path):
    info = write_series(tmp_path / "s", shape=(16, 16, 10))
    victim = info["paths"][4]
    victim.write_bytes(victim.read_bytes()[:300])
    result = scan([tmp_path])
    assert "skipped dicom file" in _warning_for(result, victim)
    _assert_refused(result.series[0], "missing slice", [info["paths"][3], info["paths"][5]])


def test_missing_slice_is_flagged_and_refused(tmp_path):
    info = write_series(tmp_path / "s", shape=(16, 16, 10), skip=(4,))
    [ref] = scan([tmp_path]).series
    _assert_refused(ref, "missing slice", [info["paths"][3], info["paths"][5]])


def test_variable_spacing_is_resampled_not_refused(tmp_path):
    info = write_series(tmp_path / "s", shape=(8, 8, 6))
    moved = info["paths"][5]
    ds = pydicom.dcmread(moved)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0  # 3.5 mm step, not 2.5
    ds.save_as(moved)
    result = scan([tmp_path])
    [ref] = result.series
    assert ref.problems == [] and result.files_used == result.files_seen == 6
    assert "variable spacing" in load(ref).meta["slice_rule"]


def test_duplicate_positions_are_flagged(tmp_path):
    info = write_series(tmp_path / "s", shape=(8, 8, 5))
    ds = pydicom.dcmread(info["paths"][2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "s" / "copy")
    [ref] = scan([tmp_path]).series
    _assert_refused(ref, "duplicate slice position", [tmp_path / "s" / "copy"])


def test_mixed_dimensions_are_flagged_and_refused(tmp_path):
    info = write_series(tmp_path / "s", shape=(16, 16, 6))
    odd = info["paths"][2]
    ds = pydicom.dcmread(odd)
    ds.Rows = ds.Columns = 8
    ds.PixelData = np.zeros((8, 8), "<u2").tobytes()
    ds.save_as(odd)
    [ref] = scan([tmp_path]).series
    _assert_refused(ref, "mixed image dimensions", [odd])


def test_non_mr_modality_is_flagged_and_refused(tmp_path):
    info = write_series(tmp_path / "s", shape=(8, 8, 4), modality="CT")
    [ref] = scan([tmp_path]).series
    assert ref.modality == "CT"
    _assert_refused(ref, "not MR", [min(info["paths"])])


def test_broken_header_is_a_warning_and_missing_input_too(tmp_path):
    info = write_series(tmp_path / "s", shape=(8, 8, 4))
    victim = info["paths"][0]
    victim.write_bytes(victim.read_bytes()[:140])  # preamble + a few bytes of meta header
    result = scan([tmp_path, tmp_path / "nope"])
    assert "skipped dicom file" in _warning_for(result, victim)
    assert any("no such file" in w for w in result.warnings)
    assert result.series[0].n_slices == 3


def test_unreadable_folder_entries_do_not_stop_the_scan(tmp_path):
    write_series(tmp_path / "s", shape=(8, 8, 4))
    (tmp_path / "s" / "dangling").symlink_to(tmp_path / "gone")
    result = scan([tmp_path])
    assert len(result.series) == 1 and "symlink to nothing" in _warning_for(result, tmp_path / "s" / "dangling")
    assert os.path.islink(tmp_path / "s" / "dangling")


# --------------------------------------------------------------------------- cheap header reads


def _header_files(tmp_path: Path) -> list[Path]:
    """Classic files in explicit and implicit VR, with private and odd elements, and the
    validation series beside the project when present."""
    write_series(tmp_path / "explicit", shape=(8, 6, 3), slope=2.0, intercept=-5.0)
    info = write_series(tmp_path / "implicit", shape=(8, 6, 3), iop=OBLIQUE_IOP)
    for i, path in enumerate(info["paths"]):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.add_new(0x00091010, "LO", "private text")
        ds.SeriesDescription = ["two", "values"] if i == 0 else "trailing \x00"
        ds.ImagePositionPatient = [" 1.5", "2e1 ", "-.5"] if i == 1 else ds.ImagePositionPatient
        ds.save_as(path, enforce_file_format=True)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    return sorted(p for p in tmp_path.rglob("*") if p.is_file()) + sorted(shared.rglob("*.dcm"))[:40]


def test_lean_header_reader_equals_pydicom(tmp_path):
    """Where the raw-element reader reads a header, it holds what pydicom's read_partial holds
    and leaves the file where pydicom does; elsewhere it declines."""
    from pydicom.filereader import read_partial

    from engine.dicom.frames import _lean_partial, _stop

    read = 0
    for path in _header_files(tmp_path):
        with open(path, "rb") as fh:
            lean, lean_at = _lean_partial(fh), fh.tell()
            fh.seek(0)
            ds, at = read_partial(fh, stop_when=_stop), fh.tell()
        if lean is None:
            continue
        read += 1
        assert lean_at == at, path
        assert list(lean.keys()) == list(ds.keys()) and lean.file_meta == ds.file_meta, path
        for elem in ds:
            assert lean[elem.tag].value == elem.value, (path, elem.tag)
    assert read >= 6  # the six written here at least


def test_header_values_equal_pydicom(tmp_path):
    """Values converted from raw bytes are pydicom's, for every keyword discovery reads."""
    from pydicom.filereader import read_partial

    from engine.dicom.frames import Header, _stop, _tag_vr

    keywords = [
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "BitsAllocated",
        "PixelRepresentation",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "RescaleSlope",
        "RescaleIntercept",
        "InstanceNumber",
        "AcquisitionNumber",
        "SeriesNumber",
        "EchoNumbers",
        "TemporalPositionIdentifier",
        "SeriesDescription",
        "Modality",
        "Manufacturer",
        "BodyPartExamined",
        "PatientAge",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "PhotometricInterpretation",
        "ImageType",
        "PatientID",
    ]
    for path in _header_files(tmp_path):
        with open(path, "rb") as fh:
            ds = read_partial(fh, stop_when=_stop)
        h = Header(ds)
        for keyword in keywords:
            expected = ds.get(keyword, "absent")
            got = h.get(keyword, "absent")
            assert (keyword in h) == (_tag_vr(keyword)[0] in ds), (path, keyword)
            if isinstance(expected, (list, tuple)) or type(expected).__name__ == "MultiValue":
                assert list(got) == list(expected), (path, keyword)
            elif isinstance(expected, float):  # DS: pydicom's DSfloat
                assert isinstance(got, float) and got == expected, (path, keyword)
            else:
                assert got == expected and str(got) == str(expected), (path, keyword)


def test_identifiers_are_worked_out_once_per_patient(tmp_path, monkeypatch):
    from engine.dicom import frames

    calls = []
    real = frames.patient_identifiers
    monkeypatch.setattr(frames, "patient_identifiers", lambda ds: calls.append(1) or real(ds))
    frames._IDENTIFIERS.clear()
    info = write_series(tmp_path / "s", shape=(8, 6, 5))
    for path in info["paths"]:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.save_as(path)
    [ref] = scan([tmp_path]).series
    assert len(ref.sources) == 5 and len(calls) == 1
