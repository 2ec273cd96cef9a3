"""PACS queries run as they arrive, the series budget is checked before a fetch, and resume follows
the instances a PACS holds, against a real Orthanc (skipped with the reason where it is absent).

Interleaving is asserted by an event log, never by timing: the first series is fetched while the
query still has pages (QIDO-RS) or responses (C-FIND) to give."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from engine.cli import cli
from orthanc_server import Orthanc, Unavailable

HEADS = ["classify"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-archive")
    made = CliRunner().invoke(cli, ["demo-archive", str(root), "--studies", "2", "--seed", "5"])
    assert made.exit_code == 0, made.output
    return root / "dicom"


@pytest.fixture(scope="module")
def series_files(archive):
    import engine

    refs = [r for r in engine.scan([archive]).series if r.modality == "MR"]
    assert len(refs) >= 5  # more series than the look-ahead of the loaders (two threads, two each)
    return {r.series_uid: sorted(s.path for s in r.sources) for r in refs}


def _start(folder: Path) -> Orthanc:
    try:
        return Orthanc.start(folder)
    except Unavailable as exc:
        pytest.skip(f"no Orthanc to test against: {exc}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, archive):
    server = _start(tmp_path_factory.mktemp("orthanc-stream"))
    server.upload(sorted(archive.rglob("*.dcm")))
    yield server
    server.stop()


def _log_fetches(monkeypatch, source_cls, log: list, fetched: threading.Event | None = None) -> None:
    real = source_cls.fetch

    def fetch(self, ref, spool):
        real(self, ref, spool)
        log.append(("fetched", ref.series_uid))
        if fetched is not None:
            fetched.set()

    monkeypatch.setattr(source_cls, "fetch", fetch)


def test_qido_pages_are_run_as_they_arrive(orthanc, series_files, tmp_path, monkeypatch):
    import engine
    import plugins.sources.dicomweb as web

    monkeypatch.setattr(web, "PAGE_SIZE", 1)
    log: list = []
    real_pages = web.DicomwebSource.pages

    def pages(self, archive, where):
        for i, page in enumerate(real_pages(self, archive, where)):
            log.append(("page", i))
            yield page

    monkeypatch.setattr(web.DicomwebSource, "pages", pages)
    _log_fetches(monkeypatch, web.DicomwebSource, log)
    summary = engine.run([orthanc.dicomweb], tmp_path / "r.zarr", heads=HEADS, backend="torch")
    assert summary.exit_code == 0 and summary.count("complete") == len(series_files)
    first_fetch = next(i for i, e in enumerate(log) if e[0] == "fetched")
    last_page = max(i for i, e in enumerate(log) if e[0] == "page")
    assert first_fetch < last_page, log  # a series was fetched and loaded while pages were still to come
    assert sum(e[0] == "page" for e in log) > len(series_files)  # one series a page, and the empty end


def test_c_find_responses_are_run_as_they_arrive(orthanc, series_files, tmp_path, monkeypatch):
    """The C-FIND at series level holds its second response until the first series is fetched:
    a run that waited for the whole listing would never fetch, and the log would say so."""
    import engine
    import plugins.sources.dimse as dimse

    log: list = []
    fetched = threading.Event()
    real_c_find = dimse.c_find

    def c_find(assoc, url, level, keys, returned):
        for n, identifier in enumerate(real_c_find(assoc, url, level, keys, returned)):
            if level == "SERIES" and n == 1 and not fetched.is_set():
                log.append(("query waits", fetched.wait(60)))
            yield identifier
        if level == "SERIES":
            log.append(("query answered", keys["StudyInstanceUID"]))

    monkeypatch.setattr(dimse, "c_find", c_find)
    _log_fetches(monkeypatch, dimse.DimseSource, log, fetched)
    summary = engine.run([orthanc.dimse], tmp_path / "r.zarr", heads=HEADS, backend="torch")
    assert summary.exit_code == 0 and summary.count("complete") == len(series_files)
    assert ("query waits", True) in log, log
    first_fetch = next(i for i, e in enumerate(log) if e[0] == "fetched")
    first_answered = next(i for i, e in enumerate(log) if e[0] == "query answered")
    assert first_fetch < first_answered, log


@pytest.mark.parametrize("url_of", ["dicomweb", "dimse"])
def test_series_over_budget_fails_before_any_fetch_and_the_run_goes_on(
    orthanc, series_files, tmp_path, monkeypatch, url_of
):
    import engine
    import plugins.sources.dicomweb as web
    import plugins.sources.dimse as dimse

    log: list = []
    source_cls = {"dicomweb": web.DicomwebSource, "dimse": dimse.DimseSource}[url_of]
    _log_fetches(monkeypatch, source_cls, log)
    sizes = {uid: len(files) for uid, files in series_files.items()}
    big = max(sizes, key=sizes.get)
    # a budget between the smallest and the largest series' declared need
    import pydicom

    def need(uid):
        ds = pydicom.dcmread(series_files[uid][0], stop_before_pixels=True)
        return engine.sources.declared_bytes(
            [{"Rows": ds.Rows, "Columns": ds.Columns, "BitsAllocated": ds.BitsAllocated}] * sizes[uid]
        )[0]

    budget = (min(need(u) for u in sizes) + need(big)) // 2
    summary = engine.run(
        [getattr(orthanc, url_of)], tmp_path / "r.zarr", heads=HEADS, backend="torch", max_series_bytes=budget
    )
    failed = {r.key: r.reason for r in summary.results if r.status == "failed"}
    assert summary.exit_code == 1 and summary.count("complete") >= 1 and failed
    assert engine.sanitise_key(big) in failed
    for key, reason in failed.items():
        assert "needs" in reason and "budget" in reason and "as the PACS declares them" in reason, reason
    fetched = {engine.sanitise_key(uid) for _, uid in log}
    assert not fetched & set(failed)  # refused before a byte was fetched
    assert len(fetched) == summary.count("complete")


def test_fetched_bytes_are_held_to_the_budget_when_the_pacs_declares_no_size(
    orthanc, series_files, tmp_path, monkeypatch
):
    import engine
    import plugins.sources.dicomweb as web

    monkeypatch.setattr(web.DicomwebSource, "image_attributes", lambda self, ref: [])  # says nothing of sizes
    monkeypatch.setattr(engine.memory_budget, "MIN_BUDGET", 1)  # the demo series are smaller than the usual floor
    smallest = min(sum(f.stat().st_size for f in files) for files in series_files.values())
    summary = engine.run(
        [orthanc.dicomweb], tmp_path / "r.zarr", heads=HEADS, backend="torch", max_series_bytes=smallest // 2
    )
    assert summary.exit_code == 1 and summary.count("failed") == len(series_files)
    for r in summary.results:
        assert "needs" in r.reason and "budget" in r.reason and "fetched so far" in r.reason, r.reason


def test_a_series_that_gains_an_instance_is_rerun(tmp_path, series_files):
    import engine

    server = _start(tmp_path / "orthanc")
    try:
        grown = max(series_files, key=lambda u: len(series_files[u]))
        files = {uid: list(f) for uid, f in series_files.items()}
        late = files[grown].pop()  # the last slice arrives at the PACS after the first run
        server.upload([f for fs in files.values() for f in fs])
        out = tmp_path / "r.zarr"
        first = engine.run([server.dicomweb], out, heads=HEADS, backend="torch")
        assert first.exit_code == 0
        key = engine.sanitise_key(grown)
        before = zarr.open_group(out, mode="r")["series"][key].attrs.asdict()
        server.upload([late])
        second = engine.run([server.dicomweb], out, heads=HEADS, backend="torch")
        by_key = {r.key: r.status for r in second.results}
        assert by_key.pop(key) == "complete"  # rerun: its instances changed
        assert set(by_key.values()) == {"resumed"}
        after = zarr.open_group(out, mode="r")["series"][key].attrs.asdict()
        import pydicom

        uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series_files[grown]]
        assert after["load_notes"]["instances_digest"] == engine.instances_digest(uids)
        assert before["load_notes"]["instances_digest"] != after["load_notes"]["instances_digest"]
        assert after["geometry"]["shape"] != before["geometry"]["shape"]
        assert after["source"] == {"url": server.dicomweb, "count": len(uids), "first": grown}
    finally:
        server.stop()


def test_a_query_that_stops_midway_runs_what_it_listed_and_a_rerun_completes(
    orthanc, series_files, tmp_path, monkeypatch
):
    import engine
    import plugins.sources.dicomweb as web

    monkeypatch.setattr(web, "PAGE_SIZE", 1)
    real_pages = web.DicomwebSource.pages

    def pages(self, archive, where):
        for i, page in enumerate(real_pages(self, archive, where)):
            if i == 2:
                raise engine.SourceError(
                    f"QIDO-RS series query failed: {engine.public_url(archive)}: cannot reach the server"
                )
            yield page

    monkeypatch.setattr(web.DicomwebSource, "pages", pages)
    out = tmp_path / "r.zarr"
    first = engine.run([orthanc.dicomweb], out, heads=HEADS, backend="torch")
    assert first.exit_code == 1 and first.count("complete") == 2 and first.count("failed") == 0
    assert any("stopped early" in w and "rerun" in w for w in first.warnings)
    monkeypatch.undo()
    second = engine.run([orthanc.dicomweb], out, heads=HEADS, backend="torch")
    assert second.exit_code == 0 and second.count("resumed") == 2
    assert second.count("complete") == len(series_files) - 2


@pytest.mark.slow
def test_ray_workers_fetch_pacs_series_themselves(orthanc, series_files, tmp_path, monkeypatch):
    """RemoteRefs travel pickled to Ray's loader tasks, which fetch over DICOMweb there: the
    driver's own fetch is broken on purpose, and the store equals a local run's."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mrfm[ray]')")
    import pickle

    import engine
    import plugins.sources.dicomweb as web
    from test_pacs import assert_same_results

    ref = next(iter(engine.sources.find([orthanc.dicomweb]).series))
    assert pickle.loads(pickle.dumps(ref)) == ref

    local = tmp_path / "local.zarr"
    assert engine.run([orthanc.dicomweb], local, heads=HEADS, backend="torch").exit_code == 0

    def not_here(self, ref, spool):
        raise AssertionError("the driver fetched a series")

    monkeypatch.setattr(web.DicomwebSource, "fetch", not_here)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        out = tmp_path / "ray.zarr"
        summary = engine.run([orthanc.dicomweb], out, heads=HEADS, backend="torch", executor="ray", ray_actors=1)
    finally:
        ray.shutdown()
    assert summary.exit_code == 0 and summary.count("complete") == len(series_files), [
        r.reason for r in summary.results
    ]
    assert_same_results(local, out)
    for _, group in zarr.open_group(out, mode="r")["series"].groups():
        assert group.attrs["executor"] == "ray" and group.attrs["actor"]
        assert group.attrs["source"]["url"] == orthanc.dicomweb
