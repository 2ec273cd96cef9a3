"""No patient identifier and no file-system path below the archive root reaches a store.

The archive's folder and file names, a SeriesDescription and the patient tags all carry a fake
name, ID and birth date; none of them may appear in any attribute or decompressed chunk of the
store, in the run record or in ``mrfm inspect``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from engine.cli import cli
from engine.synthetic import derive_uid, make_grid, write_dicom_series
from engine.synthetic.dicom_writer import Patient

NAME, PID, BIRTH = "DOE^JANE", "PID-424242", "19700101"
FORBIDDEN = ("doe^jane", "doe_jane", "jane", "424242", "19700101", "1970-01-01", "secret-ward")
RUN = ["--heads", "classify,segment,retrieve", "--backend", "torch", "--workers", "0"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phi") / "archive"
    patient = Patient(name=NAME, id=PID, birth_date=BIRTH)
    _, affine = make_grid("axial", (0.0, 0.0, 0.0), shape=(24, 24, 6), spacing=(4.0, 4.0, 4.0))
    data = 300.0 + 400.0 * np.random.default_rng(0).random((24, 24, 6))
    folder = root / "secret-ward" / "DOE_JANE_19700101" / PID
    write_dicom_series(
        folder,
        data,
        affine,
        study_uid=derive_uid(2, "phi", "study"),
        series_uid=derive_uid(2, "phi", "t1"),
        description=f"T1 {NAME} {PID} 1970-01-01",
        patient=patient,
        file_names="DOE_JANE_{:04d}.dcm",
    )
    # a broken file next to it: its reason names the file, and must not name it by path
    (folder / "DOE_JANE_9999.dcm").write_bytes((folder / "DOE_JANE_0001.dcm").read_bytes()[:400])
    nifti = root / "secret-ward" / "DOE_JANE_PID-424242_T2.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])), nifti)
    return root


def _texts(store: Path) -> list[str]:
    """Every attribute document and every array's values, decoded, of the whole store."""
    out = []
    root = zarr.open_group(str(store), mode="r")

    def walk(group: zarr.Group) -> None:
        out.append(json.dumps(dict(group.attrs), default=str))
        for _, arr in group.arrays():
            out.append(json.dumps(dict(arr.attrs), default=str))
            values = np.asarray(arr[...])
            out.append(
                " ".join(map(str, values.ravel().tolist()))
                if values.dtype.kind in "UOS"
                else values.tobytes().decode("latin-1")
            )
        for _, sub in group.groups():
            walk(sub)

    walk(root)
    return out


def test_no_identifier_or_path_below_the_root_reaches_the_store(archive, tmp_path):
    out = tmp_path / "r.zarr"
    result = CliRunner().invoke(cli, ["run", str(archive), "--out", str(out), *RUN])
    assert result.exit_code in (0, 1), result.output
    texts = _texts(out)
    descriptions = [t for t in texts if "T1 " in t]
    assert descriptions, "the DICOM series should be in the store with its (scrubbed) description"
    for text in texts:
        low = text.lower()
        for needle in FORBIDDEN:
            assert needle not in low, f"{needle!r} found in the store: {text[:300]}"
    shown = CliRunner().invoke(cli, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    for needle in FORBIDDEN:
        assert needle not in shown.output.lower()


def test_record_paths_is_the_explicit_opt_in(archive, tmp_path):
    out = tmp_path / "r.zarr"
    result = CliRunner().invoke(cli, ["run", str(archive), "--out", str(out), "--record-paths", *RUN])
    assert result.exit_code in (0, 1), result.output
    assert any("secret-ward" in t for t in _texts(out))


@pytest.mark.parametrize(
    "description, name, expected",
    [
        ("Product EPI Sag Ascending", "SAG^JOHN", "Product EPI Sag Ascending"),  # a short name part alone is a word
        ("T1 John Sag Ax", "SAG^JOHN", "T1 [removed] Ax"),  # beside the full name it goes too
        ("John Sag; Sag T2", "SAG^JOHN", "[removed]; [removed] T2"),
        ("Sagittal John", "SAG^JOHN", "Sagittal [removed]"),  # a longer part: as a whole word
        ("Johnson protocol", "SAG^JOHN", "Johnson protocol"),  # never inside another word
        ("T1 Li", "LI", "T1 [removed]"),  # a one-part name is the full name
    ],
)
def test_name_parts_are_removed_as_whole_words_and_short_ones_only_beside_the_full_name(description, name, expected):
    from pydicom import Dataset

    from engine.dicom.frames import patient_identifiers, scrub

    ds = Dataset()
    ds.PatientName, ds.PatientID = name, "ID-77"
    assert scrub(description, patient_identifiers(ds)) == expected


def test_scan_shows_the_description_rule(tmp_path):
    from engine.dicom.frames import PHI_RULE

    folder = tmp_path / "a"
    _, affine = make_grid("axial", (0.0, 0.0, 0.0), shape=(8, 8, 3), spacing=(4.0, 4.0, 4.0))
    write_dicom_series(
        folder,
        np.ones((8, 8, 3), np.float32),
        affine,
        study_uid=derive_uid(3, "rule", "study"),
        series_uid=derive_uid(3, "rule", "s"),
        description="Product EPI Sag Ascending",
        patient=Patient(name="SAG^JOHN", id="X1", birth_date="19800101"),
    )
    res = CliRunner().invoke(cli, ["scan", str(folder)])
    assert res.exit_code == 0, res.output
    assert " ".join(PHI_RULE.split()[:6]) in " ".join(res.output.split())
    listed = json.loads(CliRunner().invoke(cli, ["scan", str(folder), "--json"]).output)
    assert [s["description"] for s in listed["series"]] == ["Product EPI Sag Ascending"]
