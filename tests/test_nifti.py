"""NIfTI input: found by name, loaded with nibabel's affine, 4D reduced to the first volume."""

from __future__ import annotations

import gzip
import zipfile

import nibabel as nib
import numpy as np
import pytest

from engine.discover import LoadError, load, scan

OBLIQUE = np.array(
    [
        [-0.9, 0.1, 0.3, 40.0],
        [0.05, 1.1, -0.2, -12.0],
        [0.2, 0.15, 2.4, 7.5],
        [0, 0, 0, 1],
    ]
)


def _image(shape, affine=OBLIQUE):
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return data, nib.Nifti1Image(data, affine)


@pytest.mark.parametrize("name", ["t1.nii", "t1.nii.gz"])
def test_nifti_round_trip_keeps_data_and_affine(tmp_path, name):
    data, img = _image((9, 7, 5))
    nib.save(img, tmp_path / name)
    [ref] = scan([tmp_path]).series
    assert ref.reader == "nifti" and ref.dims == (9, 7, 5) and ref.n_slices == 5 and not ref.problems
    assert ref.key.startswith("nifti-") and ref.orientation == "oblique"
    vol = load(ref)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-5)
    assert vol.data.dtype == np.float32


def test_nifti_keys_are_stable_and_distinct_for_equal_names(tmp_path):
    for i, sub in enumerate(("a", "b")):
        (tmp_path / sub).mkdir()
        nib.save(nib.Nifti1Image(np.full((4, 4, 3), i, dtype=np.float32), OBLIQUE), tmp_path / sub / "scan.nii.gz")
    keys = [s.key for s in scan([tmp_path]).series]
    assert len(set(keys)) == 2 and keys == [s.key for s in scan([tmp_path]).series]


def test_nifti_keys_come_from_content_not_the_file_name(tmp_path):
    """A file named after the patient must not become a store key; moving it keeps its key."""
    data, img = _image((6, 5, 4))
    (tmp_path / "x").mkdir()
    nib.save(img, tmp_path / "x" / "Doe_John_19800115.nii.gz")
    [ref] = scan([tmp_path / "x"]).series
    assert ref.key.startswith("nifti-") and "doe" not in ref.key.lower() and "1980" not in ref.key
    assert ref.description == ""
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "Doe_John_19800115.nii.gz").rename(tmp_path / "y" / "other.nii.gz")
    [moved] = scan([tmp_path / "y"]).series
    assert moved.key == ref.key
    assert "source" not in load(moved).meta


def test_4d_nifti_loads_first_volume_and_says_so(tmp_path):
    data, img = _image((6, 5, 4, 3), np.diag([2.0, 2.0, 3.0, 1.0]))
    nib.save(img, tmp_path / "bold.nii.gz")
    [ref] = scan([tmp_path]).series
    assert ref.meta["volumes"] == 3 and ref.dims == (6, 5, 4) and ref.orientation == "axial"
    vol = load(ref)
    np.testing.assert_array_equal(vol.data, data[..., 0])
    assert "first volume" in vol.meta["volume_rule"]


def test_5d_nifti_is_refused_with_the_file_name(tmp_path):
    nib.save(_image((4, 4, 3, 2, 2))[1], tmp_path / "odd.nii")
    [ref] = scan([tmp_path]).series
    label = str(ref.sources[0])
    assert any(label in p and "dimensions" in p for p in ref.problems)
    with pytest.raises(LoadError, match=label):
        load(ref)


def test_nifti_inside_a_zip(tmp_path):
    data, img = _image((5, 6, 4))
    archive = tmp_path / "in.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("sub/anat.nii.gz", gzip.compress(img.to_bytes()))
    [ref] = scan([archive]).series
    assert ref.sources[0].member == "sub/anat.nii.gz"
    vol = load(ref)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-5)


def test_corrupt_nifti_is_a_warning(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    result = scan([tmp_path])
    [label] = [k for k, v in result.locations.items() if str(v).endswith("bad.nii.gz")]
    assert result.series == [] and any(label in w and "nifti" in w for w in result.warnings)
