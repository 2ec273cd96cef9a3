"""Input accounting: every file discovery looks at is either used by a series or skipped with a
kind and a reason; zip members are checked before they are opened; no path below the archive
root reaches a label, warning or reason unless ``record_paths`` asks for it."""

from __future__ import annotations

import os
import pickle
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import engine.discover as discover
from engine.errors import InputError
from engine.discover import ScanResult, Source, load, scan

from test_dicom_loading import write_series

PATIENT = "DOE^JANE_19700101"  # a folder name that must never leave the machine


def _by_path(result: ScanResult) -> dict[str, str]:
    """Skipped kind for each skipped file, keyed by its real location."""
    return {result.locations[s.source]: s.kind for s in result.skipped}


def _assert_accounted(result: ScanResult) -> None:
    assert result.files_seen == result.files_used + len(result.skipped), (result.files_seen, result.skipped)
    labels = [s.source for s in result.skipped]
    assert len(labels) == len(set(labels)), labels
    for s in result.skipped:
        assert s.kind in discover.SKIP_KINDS and s.reason
        if s.kind != "hidden":
            assert any(w.startswith(f"{s.source}: ") for w in result.warnings), (s, result.warnings)


def _sr_like(path: Path) -> Path:
    """A DICOM file without image data, as a structured report is."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for keyword in ("Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def _zip(path: Path, members: dict[str, bytes | Path]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are part of some tests
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(zipfile.ZipInfo(name.split("|")[0]), data.read_bytes() if isinstance(data, Path) else data)
    return path


@pytest.fixture
def opened(monkeypatch):
    """Names of zip members opened during the test, and bytes decompressed from each."""
    log: dict[str, int] = {}
    real_open, real_read = zipfile.ZipFile.open, zipfile.ZipExtFile.read

    def spy_open(self, name, mode="r", *args, **kwargs):
        fh = real_open(self, name, mode, *args, **kwargs)
        if mode == "r":
            fh._spy_name = name.filename if isinstance(name, zipfile.ZipInfo) else name
            log.setdefault(fh._spy_name, 0)
        return fh

    def spy_read(self, n=-1):
        data = real_read(self, n)
        if hasattr(self, "_spy_name"):
            log[self._spy_name] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipFile, "open", spy_open)
    monkeypatch.setattr(zipfile.ZipExtFile, "read", spy_read)
    return log


# --------------------------------------------------------------------------- zip members


def test_traversal_and_absolute_member_names_are_skipped_and_never_opened(tmp_path, opened):
    good = write_series(tmp_path / "src", shape=(8, 8, 3))
    evil = {
        "../evil.dcm": good["paths"][0],
        "/etc/abs.dcm": good["paths"][1],
        "a/../../up.dcm": good["paths"][2],
        "C:/win.dcm": good["paths"][0],
        "..\\back.dcm": good["paths"][1],
    }
    members = {f"ok/{p.name}": p for p in good["paths"]} | evil
    archive = _zip(tmp_path / "in" / "a.zip", members)
    result = scan([tmp_path / "in"])
    assert [r.n_slices for r in result.series] == [3]
    kinds = _by_path(result)
    assert {kinds[f"{archive}!{name}"] for name in evil} == {"zip-traversal"}
    assert not set(evil) & set(opened)
    assert result.files_seen == 8
    _assert_accounted(result)


def test_nested_encrypted_duplicate_and_corrupt_zips_are_counted(tmp_path):
    good = write_series(tmp_path / "src", shape=(8, 8, 3))
    inner = _zip(tmp_path / "inner.zip", {"x.dcm": good["paths"][0]})
    archive = _zip(
        tmp_path / "in" / "outer.zip",
        {
            "inner.zip": inner,
            "secret.dcm": good["paths"][1],
            "same.dcm": good["paths"][1],
            "same.dcm|2": good["paths"][2],
        },
    )
    data = bytearray(archive.read_bytes())
    _set_encrypted(data, b"secret.dcm")
    archive.write_bytes(bytes(data))
    broken = _zip(tmp_path / "in" / "broken.zip", {"y.dcm": good["paths"][0]})
    broken.write_bytes(broken.read_bytes().replace(b"PK\x01\x02", b"PK\x01\x09"))
    result = scan([tmp_path / "in"])
    kinds = _by_path(result)
    assert kinds[f"{archive}!inner.zip"] == "nested-zip"
    assert kinds[f"{archive}!secret.dcm"] == "encrypted"
    assert kinds[str(broken)] == "corrupt-zip"
    assert sorted(kinds.values()).count("already-seen") == 1  # the second same.dcm
    assert result.files_seen == 5  # 4 members + the unreadable zip itself
    _assert_accounted(result)


def _set_encrypted(data: bytearray, name: bytes) -> None:
    """Set the 'encrypted' flag bit on one member in its local and central headers."""
    for sig, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        start = 0
        while (at := data.find(sig, start)) >= 0:
            start = at + 4
            if data[at + name_at : at + name_at + len(name)] == name:
                data[at + flag_at] |= 0x1


def test_zip_bomb_like_member_is_skipped_without_decompressing(tmp_path, opened):
    size = 48 * 1024**2
    archive = tmp_path / "in" / "bomb.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.dcm", "w") as out:
        chunk = bytes(1024**2)
        for _ in range(size // len(chunk)):
            out.write(chunk)
    assert archive.stat().st_size < size / 500
    start = time.perf_counter()
    result = scan([archive])
    assert time.perf_counter() - start < 5
    assert [(s.source, s.kind) for s in result.skipped] == [("bomb.zip#1", "zip-bomb")]
    assert opened.get("zeros.dcm", 0) == 0
    _assert_accounted(result)


def test_member_declared_larger_than_the_cap_is_skipped_unopened(tmp_path, monkeypatch, opened):
    info = write_series(tmp_path / "src", shape=(8, 8, 2))
    archive = _zip(tmp_path / "in.zip", {"a.dcm": info["paths"][0], "b.dcm": info["paths"][1]})
    monkeypatch.setattr(discover, "ZIP_MEMBER_MAX_BYTES", info["paths"][0].stat().st_size - 1)
    result = scan([archive])
    assert set(_by_path(result).values()) == {"too-large"} and len(result.skipped) == 2
    assert "limit" in result.skipped[0].reason and not opened
    _assert_accounted(result)


def test_big_member_header_is_read_without_reading_the_whole_member(tmp_path, opened):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 2048
    pixels = np.random.default_rng(0).integers(0, 4000, (2048, 2048), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    src = tmp_path / "big.dcm"
    ds.save_as(src)
    archive = _zip(tmp_path / "in.zip", {"big.dcm": src})
    result = scan([archive])
    [ref] = result.series
    assert ref.dims == (2048, 2048, 1)
    assert opened["big.dcm"] < 64 * 1024 < src.stat().st_size / 100  # header and digest bytes only
    with ref.sources[0].open() as fh:  # streamed, and seekable as pydicom needs
        fh.seek(0, os.SEEK_END)
        assert fh.tell() == src.stat().st_size
        fh.seek(128)
        assert fh.read(4) == b"DICM"
    assert opened["big.dcm"] < 64 * 1024
    vol = load(ref)
    np.testing.assert_array_equal(vol.data[:, :, 0], pixels.T)


# --------------------------------------------------------------------------- folders and symlinks


def test_symlinked_study_folder_inside_the_archive_is_followed(tmp_path):
    root = tmp_path / "archive"
    info = write_series(root / ".pacs" / "study", shape=(8, 8, 4))
    (root / "study").symlink_to(root / ".pacs" / "study", target_is_directory=True)
    result = scan([root])
    [ref] = result.series
    assert ref.series_uid == info["series_uid"] and ref.n_slices == 4
    assert result.files_seen == 5  # four slices + the hidden folder
    _assert_accounted(result)


def test_a_folder_reached_twice_is_scanned_once(tmp_path):
    root = tmp_path / "archive"
    write_series(root / "z_real", shape=(8, 8, 4))
    (root / "a_link").symlink_to(root / "z_real", target_is_directory=True)
    (root / "z_real" / "slice_again").symlink_to(next((root / "z_real").iterdir()))
    result = scan([root])
    [ref] = result.series
    assert ref.n_slices == 4 and ref.problems == []
    assert sorted(_by_path(result).values()) == ["already-seen", "already-seen"]
    _assert_accounted(result)


def test_symlink_loop_terminates_and_is_reported(tmp_path):
    root = tmp_path / "archive"
    write_series(root / "s", shape=(8, 8, 3))
    (root / "s" / "loop").symlink_to(root, target_is_directory=True)
    (root / "s" / "self").symlink_to(root / "s", target_is_directory=True)
    (root / "ping").symlink_to(root / "pong")
    (root / "pong").symlink_to(root / "ping")
    result = scan([root])
    assert [r.n_slices for r in result.series] == [3]
    kinds = _by_path(result)
    assert kinds[str(root / "s" / "loop")] == kinds[str(root / "s" / "self")] == "symlink-loop"
    assert kinds[str(root / "ping")] == kinds[str(root / "pong")] == "broken-symlink"
    _assert_accounted(result)


def test_symlinks_outside_the_archive_are_skipped_with_a_reason(tmp_path):
    root = tmp_path / "archive"
    write_series(root / "s", shape=(8, 8, 3))
    elsewhere = write_series(tmp_path / "elsewhere" / "study", shape=(8, 8, 5))
    (root / "linked_study").symlink_to(tmp_path / "elsewhere" / "study", target_is_directory=True)
    (root / "s" / "linked_file").symlink_to(elsewhere["paths"][0])
    (root / "s" / "dangling").symlink_to(tmp_path / "gone")
    result = scan([root])
    assert [r.n_slices for r in result.series] == [3]
    kinds = _by_path(result)
    assert kinds[str(root / "linked_study")] == kinds[str(root / "s" / "linked_file")] == "symlink-outside"
    assert kinds[str(root / "s" / "dangling")] == "broken-symlink"
    assert all("elsewhere" not in w for w in result.warnings)
    _assert_accounted(result)


def test_unreadable_file_is_counted(tmp_path):
    root = tmp_path / "archive"
    info = write_series(root / "s", shape=(8, 8, 3))
    victim = info["paths"][1]
    victim.chmod(0)
    try:
        if os.access(victim, os.R_OK):
            pytest.skip("running as a user that reads mode-000 files (root)")
        result = scan([root])
    finally:
        victim.chmod(0o644)
    assert _by_path(result) == {str(victim): "unreadable"}
    _assert_accounted(result)


def test_permission_denied_files_and_folders_are_counted(tmp_path, monkeypatch):
    """The same as above wherever the tests run as root: the OS refusal is simulated."""
    root = tmp_path / "archive"
    info = write_series(root / "s", shape=(8, 8, 3))
    write_series(root / "t", shape=(8, 8, 2))
    victim, real_open, real_scandir = info["paths"][1], open, os.scandir

    def refusing_open(path, *args, **kwargs):
        if Path(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def refusing_scandir(path):
        if Path(path) == root / "t":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(discover, "open", refusing_open, raising=False)
    monkeypatch.setattr(discover.os, "scandir", refusing_scandir)
    result = scan([root])
    assert _by_path(result) == {str(victim): "unreadable", str(root / "t"): "unreadable"}
    assert all("Permission denied" in s.reason and str(root) not in s.reason for s in result.skipped)
    _assert_accounted(result)


def test_fifo_is_skipped_not_opened(tmp_path):
    root = tmp_path / "archive"
    write_series(root, shape=(8, 8, 2))
    os.mkfifo(root / "pipe")
    result = scan([root])
    assert _by_path(result) == {str(root / "pipe"): "special"}
    _assert_accounted(result)


def test_files_that_are_not_images_are_counted_by_kind(tmp_path):
    root = tmp_path / "archive"
    info = write_series(root / "s", shape=(8, 8, 3))
    (root / "empty.dcm").write_bytes(b"")
    (root / "notes.dcm").write_text("a text file named .dcm\n")
    _sr_like(root / "report.dcm")
    (root / "broken.nii").write_bytes(b"not a NIfTI header" * 30)
    copy = root / "s" / "zz_copy"
    copy.write_bytes(info["paths"][0].read_bytes())  # same SOP instance: one of the two is left out
    (root / ".DS_Store").write_bytes(b"\x00")
    result = scan([root])
    assert [r.n_slices for r in result.series] == [3]
    assert result.skipped_counts() == {
        "bad-header": 1,
        "empty": 1,
        "hidden": 1,
        "left-out": 1,
        "not-image": 1,
        "unrecognised": 1,
    }
    kinds = _by_path(result)
    assert kinds[str(root / "report.dcm")] == "not-image" and kinds[str(root / "notes.dcm")] == "unrecognised"
    assert result.files_seen == 9
    _assert_accounted(result)


def test_missing_input_and_empty_folder_return_facts_without_raising(tmp_path):
    (tmp_path / "empty").mkdir()
    result = scan([tmp_path / "nope", tmp_path / "empty"])
    assert result.series == [] and result.skipped == [] and result.files_seen == 0
    assert result.warnings == [f"{tmp_path / 'nope'}: no such file or folder"]


# --------------------------------------------------------------------------- labels, no PHI


def _phi_archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    person = root / PATIENT
    info = write_series(person / "MR_BRAIN", shape=(8, 8, 8), skip=(3,))  # a problem naming files
    (person / f"{PATIENT}.nii").write_bytes(b"not a NIfTI header" * 30)  # nibabel quotes the path
    _sr_like(person / f"{PATIENT}_report.dcm")
    (person / f"{PATIENT}.txt").write_text("notes\n")
    (person / "empty").write_bytes(b"")
    (person / "link_out").symlink_to(tmp_path)
    _zip(
        person / f"{PATIENT}.zip", {f"{PATIENT}/{p.name}": p for p in info["paths"] if p} | {f"../{PATIENT}.dcm": b"x"}
    )
    return root


def test_labels_warnings_and_reasons_hold_no_path_below_the_root(tmp_path):
    root = _phi_archive(tmp_path)
    result = scan([root])
    texts = [str(s) for ref in result.series for s in ref.sources] + result.warnings
    texts += [s.source + " " + s.reason for s in result.skipped]
    texts += [p for ref in result.series for p in ref.problems] + [ref.key for ref in result.series]
    texts += [repr(s) for ref in result.series for s in ref.sources] + [repr(result)]
    for ref in result.series:
        texts.append(str(ref.meta))
        with pytest.raises(InputError) as err:
            load(ref)
        texts.append(str(err.value))
    assert len(texts) > 20 and not [t for t in texts if "DOE" in t or str(tmp_path) in t]
    labels = [str(s) for ref in result.series for s in ref.sources]
    assert all(label.startswith("archive#") for label in labels)
    assert any(label.count("#") == 2 for label in labels)  # zip members: <zip label>#<m>
    assert len(result.series) == 1 and result.skipped_counts() == {
        "bad-header": 1,
        "empty": 1,
        "left-out": 7,
        "not-image": 1,
        "symlink-outside": 1,
        "unrecognised": 1,
        "zip-traversal": 1,
    }
    _assert_accounted(result)


def test_record_paths_restores_full_paths(tmp_path):
    root = _phi_archive(tmp_path)
    result = scan([root], record_paths=True)
    sources = [s for ref in result.series for s in ref.sources]
    assert all(str(s) == s.path_text and str(root / PATIENT) in str(s) for s in sources)
    assert any(f"{PATIENT}.txt" in w for w in result.warnings)


def test_labels_are_stable_and_the_digest_finds_the_file_again(tmp_path):
    root = tmp_path / "archive"
    info = write_series(root / PATIENT, shape=(8, 8, 3))
    copy = _zip(tmp_path / "copy.zip", {p.name: p for p in info["paths"]})
    first, again = scan([root]), scan([root])
    assert first.locations == again.locations and list(first.locations) == ["archive#1", "archive#2", "archive#3"]
    [ref], [zipped] = first.series, scan([copy]).series
    in_zip = {s.name: s for s in zipped.sources}
    for source in ref.sources:
        assert source.digest == in_zip[source.name].digest and len(source.digest) == 16
        assert Path(first.locations[str(source)]) in info["paths"]
    assert len({s.digest for s in ref.sources}) == 3


def test_source_identity_is_path_and_member_not_label(tmp_path):
    a = Source(tmp_path / "x", None, "archive#1", "0" * 16)
    b = Source(tmp_path / "x")
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert str(a) == "archive#1" and str(b) == str(tmp_path / "x") and "x" not in repr(a).replace("archive", "")
    again = pickle.loads(pickle.dumps(a))
    assert str(again) == "archive#1" and again.digest == a.digest and again.path_text == str(tmp_path / "x")


def test_two_roots_with_one_name_get_distinct_labels(tmp_path):
    write_series(tmp_path / "a" / "dicom", shape=(8, 8, 2), seed=1)
    write_series(tmp_path / "b" / "dicom", shape=(8, 8, 2), seed=2)
    result = scan([tmp_path / "a" / "dicom", tmp_path / "b" / "dicom"])
    labels = {str(s) for ref in result.series for s in ref.sources}
    assert len(labels) == 4 and {label.split("#")[0] for label in labels} == {"dicom", "dicom[2]"}


def test_an_image_without_its_matrix_size_is_a_bad_header_and_a_report_is_not_an_image(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.Rows, ds.Columns, ds.PixelData  # an MR image object that lost its matrix size
    ds.save_as(tmp_path / "cut.dcm")
    sr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    del sr.Rows, sr.Columns, sr.PixelData
    sr.save_as(tmp_path / "report.dcm")
    result = scan([tmp_path], record_paths=True)
    kinds = {s.source: (s.kind, s.reason) for s in result.skipped}
    assert (
        kinds[str(tmp_path / "cut.dcm")][0] == "bad-header"
        and "incomplete image header" in kinds[str(tmp_path / "cut.dcm")][1]
    )
    assert kinds[str(tmp_path / "report.dcm")][0] == "not-image"
