"""mrfm deletes and overwrites only what it created, where it created it: a user's folder given as
--out is refused (with or without --overwrite), a tampered store cannot steer an export outside
its --out, and source lookups read only recorded roots that are real folders or files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.errors import StoreError, UsageError
from engine.export import MANIFEST, ExportContext, export
from engine.export_paths import source_roots
from engine.safe_paths import inside, is_safe_name
from engine.store import ResultStore, open_store
from engine.synthetic.small_archive import write_small_archive

RUN = ["--heads", "segment,classify", "--backend", "torch", "--workers", "0"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_small_archive(tmp_path_factory.mktemp("own") / "archive", seed=3, name="own")


@pytest.fixture(scope="module")
def store(archive, tmp_path_factory) -> Path:
    """A store from a run given a relative archive path, from another working folder."""
    out = tmp_path_factory.mktemp("own-store") / "r.zarr"
    cwd = os.getcwd()
    os.chdir(archive.parent)
    try:
        result = CliRunner().invoke(cli, ["run", archive.name, "--out", str(out), *RUN])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return out


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def clean(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and (
        result.exception is None or isinstance(result.exception, SystemExit)
    ), result.output
    for needle in needles:
        assert needle in result.output, result.output


# ---- --out ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_user_folder_given_as_out_is_refused_and_left_as_it_was(archive, tmp_path, overwrite):
    user = tmp_path / "u"
    (user / "index").mkdir(parents=True)
    (user / "index" / "notes.txt").write_text("keep")
    (user / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"mine": 1}}))
    before = listing(user)
    result = CliRunner().invoke(
        cli, ["run", str(archive), "--out", str(user), *RUN, *(["--overwrite"] if overwrite else [])]
    )
    clean(result, 2, str(user), "not an mrfm result store")
    assert listing(user) == before


def test_overwrite_replaces_an_mrfm_store_and_an_empty_folder_is_taken(archive, store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(cli, ["run", str(archive), "--out", str(empty), *RUN]).exit_code == 0
    again = CliRunner().invoke(cli, ["run", str(archive), "--out", str(empty), *RUN, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert [a["status"] for a in open_store(empty).runs().values()] == ["finished", "finished"]


def test_the_python_api_refuses_a_user_folder_too(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UsageError, match="not an mrfm result store"):
        ResultStore(tmp_path, mode="a")
    assert sorted(os.listdir(tmp_path)) == ["photo.jpg"]


# ---- names from the store ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/tmp/victim", "..", ".", "../x", "a/b", "", ".hidden", "x" * 129, "a\x00b", "é"])
def test_names_that_could_leave_their_folder_are_not_safe(name, tmp_path):
    assert not is_safe_name(name)
    with pytest.raises(StoreError):
        inside(tmp_path, name)


def test_a_symlink_inside_the_out_folder_cannot_lead_outside(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "key").symlink_to(elsewhere)
    with pytest.raises(StoreError, match="outside"):
        inside(out, "key", "file.nii.gz")
    assert inside(out, "other", "file.nii.gz") == out / "other" / "file.nii.gz"


def tampered_copy(store: Path, tmp_path: Path, head: str) -> Path:
    """The store with its segment head recorded under ``head``, and its outputs moved where zarr
    finds that name (``/tmp/victim`` reads as the group ``tmp/victim``): a forged store."""
    import shutil

    copy = tmp_path / "tampered.zarr"
    shutil.copytree(store, copy)
    for meta in copy.glob("series/*/zarr.json"):
        doc = json.loads(meta.read_text())
        heads = doc["attributes"]["heads"]
        heads[head] = heads.pop("segment")
        meta.write_text(json.dumps(doc))
        node = meta.parent / head.strip("/")
        if ".." not in head:
            node.parent.mkdir(parents=True, exist_ok=True)
            (node.parent / "zarr.json").write_text(
                json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
            )
            (meta.parent / "segment").rename(node)
    return copy


@pytest.mark.parametrize("head", ["/tmp/victim", "../../victim"])
def test_a_head_named_like_a_path_fails_its_series_and_writes_nothing_outside_out(store, tmp_path, head):
    victim_dir = Path("/tmp") if head.startswith("/") else tmp_path
    before = {p.name for p in victim_dir.glob("victim*")}
    copy = tampered_copy(store, tmp_path, head)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(copy), "--format", "nifti", "--out", str(out)])
    assert {p.name for p in victim_dir.glob("victim*")} == before  # (it was /tmp/victim_anatomy.nii.gz)
    assert set(listing(out)) == {MANIFEST}
    assert result.exit_code == 1, result.output
    assert "not a plain name" in result.output and "Traceback" not in result.output


def test_a_tampered_manifest_never_names_files_outside_the_out_folder(store, tmp_path):
    out = tmp_path / "out"
    assert export(store, "nifti", out).exit_code == 0
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"not yours")
    manifest = json.loads((out / MANIFEST).read_text())
    key = next(iter(manifest["formats"]["nifti"]["series"]))
    manifest["formats"]["dicom-seg"] = {"series": {key: {"files": ["../secret.dcm", str(secret)]}}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    ctx = ExportContext(open_store(store), out, "dicom-sr", manifest=manifest)
    assert ctx.exported("dicom-seg", key) == []


def test_an_export_into_a_user_folder_is_refused(store, tmp_path):
    (tmp_path / "scores.csv").write_text("mine")
    result = CliRunner().invoke(cli, ["export", str(store), "--format", "table", "--out", str(tmp_path)])
    clean(result, 2, "holds no mrfm-export.json")
    assert (tmp_path / "scores.csv").read_text() == "mine"


# ---- archive roots -------------------------------------------------------------------------------
def test_archive_roots_are_recorded_absolutely_and_export_finds_the_sources_from_anywhere(archive, store, tmp_path):
    (run,) = open_store(store).runs().values()
    assert run["config"]["paths"] == [str(archive)]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = export(store, "dicom-seg", tmp_path / "seg")
    finally:
        os.chdir(cwd)
    assert result.counts == {"exported": 1}, [r.reason for r in result.results]


def test_recorded_roots_that_are_no_folder_or_the_file_system_root_are_not_searched(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    roots, refused = source_roots(
        ["/", str(fifo), str(tmp_path / "gone"), str(tmp_path), str(tmp_path), 7], recorded=True
    )
    assert roots == [tmp_path]
    assert [r.split(":")[0] for r in refused] == ["/", str(fifo), str(tmp_path / "gone"), "7"]
    assert source_roots([str(tmp_path)], recorded=False)[0] == [tmp_path]


def test_a_store_whose_run_records_root_slash_does_not_crawl_the_machine(store, tmp_path, monkeypatch):
    import engine.discover

    import shutil

    copy = tmp_path / "slash.zarr"
    shutil.copytree(store, copy)
    (run_dir,) = [p for p in (copy / "runs").iterdir() if p.is_dir()]
    doc = json.loads((run_dir / "zarr.json").read_text())
    doc["attributes"]["config"]["paths"] = ["/", str(tmp_path / "gone")]
    (run_dir / "zarr.json").write_text(json.dumps(doc))
    scanned = []
    monkeypatch.setattr(engine.discover, "scan", lambda paths, **kw: scanned.append(paths))
    result = export(copy, "dicom-seg", tmp_path / "seg")
    assert scanned == []
    (failed,) = result.results
    assert failed.status == "failed" and "a file-system root" in failed.reason


def test_sources_are_looked_up_root_by_root_until_found(archive, store, tmp_path, monkeypatch):
    import engine.discover

    real_scan = engine.discover.scan
    scanned = []

    def counting(paths, **kw):
        scanned.append([str(p) for p in paths])
        return real_scan(paths, **kw)

    monkeypatch.setattr(engine.discover, "scan", counting)
    other = tmp_path / "other"
    other.mkdir()
    ctx = ExportContext(open_store(store), tmp_path / "o", "dicom-seg", archive=[archive, other])
    (key,) = [k for k, _ in open_store(store).iter_series()]
    assert ctx.source(key).key == key
    assert scanned == [[str(archive)]]  # found in the first root: the second is never read
