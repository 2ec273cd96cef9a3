"""PACS in and out against a real Orthanc (Debian's orthanc + orthanc-dicomweb): DICOMweb and DIMSE
runs equal a run from disk, SEG/SR go back with STOW-RS and C-STORE, the listener runs a study
Orthanc sends, and a server that is absent, refuses or goes away costs one line and no data."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from engine.cli import cli
from orthanc_server import Orthanc, Unavailable, free_port

HEADS = ["classify", "segment"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs-archive")
    made = CliRunner().invoke(cli, ["demo-archive", str(root), "--studies", "1", "--seed", "3"])
    assert made.exit_code == 0, made.output
    return root / "dicom"


@pytest.fixture(scope="module")
def listener_port():
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, archive, listener_port):
    try:
        server = Orthanc.start(tmp_path_factory.mktemp("orthanc"), modalities={"mrfm": ("MRFM", listener_port)})
    except Unavailable as exc:
        pytest.skip(f"no Orthanc to test against: {exc}")
    server.upload(sorted(archive.rglob("*.dcm")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def disk_store(tmp_path_factory, archive):
    import engine

    out = tmp_path_factory.mktemp("disk") / "r.zarr"
    summary = engine.run([archive], out, heads=HEADS, backend="torch", workers=0)
    assert summary.count("complete") >= 2
    return out


def _arrays(group, prefix=""):
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            yield prefix + name, node[...]
        else:
            yield from _arrays(node, prefix + name + "/")


def assert_same_results(a: Path, b: Path, skipped_extra: bool = False) -> None:
    """Same series, statuses and geometry; masks bitwise, floats within 1e-5. ``skipped_extra``:
    ``b`` may also hold series with no image (SEG, SR sent to the PACS earlier), each skipped."""
    ga, gb = zarr.open_group(a, mode="r")["series"], zarr.open_group(b, mode="r")["series"]
    extra = set(gb.group_keys()) - set(ga.group_keys())
    if skipped_extra:
        assert all(gb[k].attrs["status"] == "skipped" for k in extra), extra
    else:
        assert not extra
    assert set(ga.group_keys()) <= set(gb.group_keys())
    for key in ga.group_keys():
        sa, sb = ga[key], gb[key]
        assert sa.attrs["status"] == sb.attrs["status"] == "complete"
        assert sa.attrs["geometry"] == sb.attrs["geometry"]
        xa, xb = dict(_arrays(sa)), dict(_arrays(sb))
        assert xa.keys() == xb.keys() and xa
        for name, x in xa.items():
            if x.dtype.kind == "f":
                np.testing.assert_allclose(x, xb[name], atol=1e-5, rtol=0)
            else:
                np.testing.assert_array_equal(x, xb[name])


def test_dicomweb_run_pages_through_qido_and_equals_disk(orthanc, disk_store, tmp_path, monkeypatch):
    import engine
    import plugins.sources.dicomweb as web

    monkeypatch.setattr(web, "PAGE_SIZE", 1)  # fewer than the archive's series: paging must be honest
    out = tmp_path / "web.zarr"
    summary = engine.run([orthanc.dicomweb], out, heads=HEADS, backend="torch")
    assert summary.count("complete") == len(list(zarr.open_group(disk_store, mode="r")["series"].group_keys())) > 1
    assert_same_results(disk_store, out)
    store = zarr.open_group(out, mode="r")
    key = next(iter(store["series"].group_keys()))
    assert store["series"][key].attrs["source"]["url"] == orthanc.dicomweb
    assert store["series"][key].attrs["load_notes"]["instances_digest"].startswith("blake2b:")
    # resume: nothing changed in the PACS, nothing is fetched or run again
    again = engine.run([orthanc.dicomweb], out, heads=HEADS, backend="torch")
    assert again.count("resumed") == summary.count("complete") and again.count("complete") == 0


def test_dimse_run_with_where_equals_disk(orthanc, disk_store, tmp_path):
    out = tmp_path / "dimse.zarr"
    res = CliRunner().invoke(
        cli,
        [
            "run",
            orthanc.dimse,
            "--out",
            str(out),
            "--heads",
            ",".join(HEADS),
            "--backend",
            "torch",
            "--where",
            "Modality=MR",
            "--log-json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert_same_results(disk_store, out)


def test_seg_and_sr_sent_back_once_and_listed_under_the_source_study(orthanc, disk_store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "exports"
    seg = runner.invoke(
        cli, ["export", str(disk_store), "--format", "dicom-seg", "--out", str(out), "--to", orthanc.dicomweb]
    )
    assert seg.exit_code == 0, seg.output
    sr = runner.invoke(
        cli, ["export", str(disk_store), "--format", "dicom-sr", "--out", str(out), "--to", orthanc.dimse]
    )
    assert sr.exit_code == 0, sr.output
    stored = [s.attrs for _, s in zarr.open_group(disk_store, mode="r")["series"].groups()]
    studies = {a["study_uid"]: a["series_uid"] for a in stored}
    for study, series in studies.items():
        listed = {m: orthanc.qido(f"/studies/{study}/series?Modality={m}") for m in ("SEG", "SR")}
        assert listed["SEG"] and listed["SR"]
    # every SEG in Orthanc references a source series of its study
    seg_series = orthanc.qido("/series?Modality=SEG")
    n_before = len(orthanc.get("/instances"))
    import pydicom

    for seg_file in Path(out).rglob("seg_*.dcm"):
        seg_ds = pydicom.dcmread(seg_file)
        assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID in {a["series_uid"] for a in stored}
        assert orthanc.qido(f"/studies/{seg_ds.StudyInstanceUID}/series/{seg_ds.SeriesInstanceUID}/instances")
    assert seg_series
    # a rerun sends nothing again
    again = runner.invoke(
        cli, ["export", str(disk_store), "--format", "dicom-seg", "--out", str(out), "--to", orthanc.dicomweb]
    )
    assert again.exit_code == 0 and "sent" not in again.output.split("->")[0]
    assert len(orthanc.get("/instances")) == n_before


@pytest.mark.parametrize(
    "url,needle",
    [
        ("dicomweb+http://127.0.0.1:{closed}/dicom-web", "cannot reach the server"),
        ("dimse://ORTHANC@127.0.0.1:{closed}", "cannot connect"),
        ("dimse://NOT-ORTHANC@127.0.0.1:{dicom}", "association was rejected"),
    ],
)
def test_unreachable_or_refusing_server_is_one_line_exit_2(orthanc, tmp_path, url, needle):
    url = url.format(closed=free_port(), dicom=orthanc.dicom_port)
    out = tmp_path / "r.zarr"
    res = CliRunner().invoke(cli, ["run", url, "--out", str(out), "--heads", "classify", "--backend", "torch"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output
    assert not out.exists()  # nothing written


def test_server_gone_mid_run_fails_the_rest_and_a_rerun_completes(tmp_path, archive, disk_store, monkeypatch):
    import engine
    from plugins.sources.dicomweb import DicomwebSource

    try:
        server = Orthanc.start(tmp_path / "orthanc")
    except Unavailable as exc:
        pytest.skip(f"no Orthanc to test against: {exc}")
    try:
        server.upload(sorted(archive.rglob("*.dcm")))
        out = tmp_path / "r.zarr"

        source = DicomwebSource
        real_fetch, fetched, calls = source.fetch, threading.Event(), []

        def fetch_then_vanish(self, ref, spool):
            calls.append(ref.key)
            if len(calls) > 1:  # the PACS goes away once the first series is fetched
                fetched.wait(60)
                server.stop()
            real_fetch(self, ref, spool)
            fetched.set()

        monkeypatch.setattr(source, "fetch", fetch_then_vanish)
        first = engine.run([server.dicomweb], out, heads=HEADS, backend="torch")
        monkeypatch.undo()
        assert first.count("complete") >= 1 and first.count("failed") >= 1 and first.exit_code == 1
        assert all("fetch failed" in r.reason for r in first.results if r.status == "failed")
        server._launch(server.proc.args[0])  # same ports, same storage
        second = engine.run([server.dicomweb], out, heads=HEADS, backend="torch")
        assert second.exit_code == 0 and second.count("complete") == first.count("failed")
        assert second.count("resumed") == first.count("complete")
        assert_same_results(disk_store, out)
    finally:
        server.stop()


def test_listener_runs_a_study_orthanc_sends_and_forwards_seg(orthanc, listener_port, disk_store, tmp_path):
    from engine.listen import listen

    out = tmp_path / "listened.zarr"
    done = threading.Event()
    events = []

    def on_event(e):
        events.append(e)
        if e.get("event") == "study":
            done.set()

    idle = 1.0
    worker = threading.Thread(
        target=listen,
        args=(listener_port, out),
        kwargs=dict(
            ae_title="MRFM",
            heads=HEADS,
            idle_seconds=idle,
            forward=orthanc.dimse,
            spool=tmp_path / "spool",
            on_event=on_event,
            should_stop=done.is_set,
            backend="torch",
        ),
        daemon=True,
    )
    worker.start()
    time.sleep(0.5)
    study = orthanc.get("/studies")[0]
    n_seg = len(orthanc.qido("/series?Modality=SEG"))
    t0 = time.monotonic()
    orthanc.request("POST", "/modalities/mrfm/store", study.encode() if isinstance(study, str) else study)
    worker.join(300)
    assert done.is_set(), events
    seconds = time.monotonic() - t0
    run_seconds = next(e for e in events if e.get("event") == "done")["seconds"]
    assert seconds <= idle + run_seconds + 30  # sending, idle time, the run, forwarding
    assert_same_results(disk_store, out, skipped_extra=True)  # the study also holds SEG/SR sent by earlier tests
    assert len(orthanc.qido("/series?Modality=SEG")) >= max(n_seg, 1)
    assert not any((tmp_path / "spool").glob("*/*.dcm"))  # the spool was released
