"""Every command that reads a store, over every case of the tampered-store corpus
(engine.synthetic.bad_store): the exit code each must end with, the tampered node named where it
fails, no traceback, no raw control character on the terminal, nothing written outside its --out
folder, and a peak memory that stays small whatever the store declares (10^63 voxels, 10^9
embedding rows, a 50 MB attribute, JSON 100,000 deep).

Commands run in-process (a subprocess per command would cost seconds of start-up each); the peak
RSS of each is measured by resetting the process's high-water mark (/proc/self/clear_refs) before
it and reading VmHWM after it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.synthetic import derive_uid, make_grid, write_dicom_series
from engine.synthetic.bad_store import CASES, MASK, READERS, expected_exit, reader_args, victim, write_tampered_stores

RAW_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # what may drive a terminal: C0 but \t \n \r, DEL, C1
READER_MIB = 256  # a reader of this kilobyte-sized store needs far less; the attacks reached 2.5-17.5 GB
RUN_MIB = 1024  # the run also loads the model and decodes a series
# what names the tampered node (or the refusal) in the command's output, where it fails
SAID = {
    "huge_mask_shape": MASK,
    "huge_index_embedding": "index/embedding",
    "huge_attribute": "series/s2/zarr.json",
    "deep_json": "series/s2/zarr.json",
    "huge_chunk_grid": "index/key_hash",
    "escaped_key": r"s2\x1b]0;pwned\x07",
    "head_as_path": "victim",
    "terminal_escapes": "s2",
}
SAID_BY = {
    ("root_slash", "export dicom-seg"): "not searched: /: a file-system root",
    ("head_as_path", "export dicom-seg"): "is not a plain name",
    ("escaped_key", "export dicom-seg"): SAID["escaped_key"],
}
NO_SOURCES = "source files are not under the archive roots"  # the corpus's series have no files to find


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("tampered")
    folder = root / "archive"
    _, affine = make_grid("axial", (0.0, 0.0, 0.0), shape=(24, 24, 6), spacing=(4.0, 4.0, 4.0))
    write_dicom_series(
        folder / "s",
        300 + 400 * np.random.default_rng(3).random((24, 24, 6)),
        affine,
        study_uid=derive_uid(3, "tampered", "study"),
        series_uid=derive_uid(3, "tampered", "series"),
        description="T1",
    )
    return write_tampered_stores(root / "corpus"), folder


def state(folder: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` but ``skip``: (size, mtime) by path."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and skip not in p.parents
    }


def peak_mib(call):
    """(result of ``call()``, its peak RSS growth in MiB): the high-water mark is reset first."""

    def status(field: str) -> int:
        with open("/proc/self/status") as fh:
            return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1)) // 1024

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    base = status("VmRSS")
    result = call()
    return result, status("VmHWM") - base


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("case", list(CASES))
def test_each_reader_of_a_tampered_store_ends_as_documented(corpus, tmp_path, case, command):
    stores, archive = corpus
    store = stores[case]
    if command == "run":  # the run writes into the store: its own copy, beside the others
        store = store.with_name(f"{case}-run.zarr")
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(stores[case], store)
    out = tmp_path / "out"
    before = state(store.parent, store)  # the corpus folder: the other stores, the archive and where victim* would be
    result, grew = peak_mib(lambda: CliRunner().invoke(cli, reader_args(command, store, out, archive)))
    text = result.output
    want = expected_exit(case, command)
    assert result.exit_code == want, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    assert not RAW_CONTROL.search(text), repr(text[-300:])
    if want:
        usual = NO_SOURCES if command == "export dicom-seg" else SAID.get(case, "")
        assert SAID_BY.get((case, command), usual) in text, text
    after = state(store.parent, store)
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}, "written outside --out"
    assert not list(victim(stores[case]).parent.glob("victim*"))
    assert grew < (RUN_MIB if command == "run" else READER_MIB), f"peak RSS grew {grew} MiB"


def test_the_corpus_names_each_case_and_tampers_only_its_node(corpus):
    stores, _ = corpus
    clean = stores["huge_mask_shape"].with_name("clean.zarr")
    assert CliRunner().invoke(cli, ["validate", str(clean)]).exit_code == 0
    assert set(stores) == set(CASES)
    assert (stores["huge_attribute"] / "series" / "s2" / "zarr.json").stat().st_size > 50 * 2**20


# ---- bounded reads of the store's own files -----------------------------------------------------
def test_a_huge_lock_file_is_read_no_further_than_a_lock_record(tmp_path):
    from engine.store import LOCK_NAME, ResultStore

    store = write_small_store_copy(tmp_path)
    with open(store / LOCK_NAME, "wb") as fh:
        fh.truncate(4 * 2**30)  # sparse: 4 GiB declared, nothing on disk
    holder, grew = peak_mib(lambda: ResultStore(store, mode="r").lock_holder())
    assert holder == {} and grew < 64, grew  # unreadable as a record; never read whole


def test_a_huge_root_zarr_json_is_refused_unread(tmp_path):
    from engine.errors import StoreError
    from engine.store import ResultStore

    store = write_small_store_copy(tmp_path)
    with open(store / "zarr.json", "r+b") as fh:
        fh.truncate(4 * 2**30)

    def open_it():
        with pytest.raises(StoreError, match="over the 8 MiB limit"):
            ResultStore(store, mode="r")

    _, grew = peak_mib(open_it)
    assert grew < 64, grew
    result = CliRunner().invoke(cli, ["inspect", str(store)])
    assert result.exit_code == 3 and "zarr.json" in result.output and result.exception.__class__ is SystemExit, (
        result.output
    )


def write_small_store_copy(tmp_path: Path) -> Path:
    from engine.synthetic.bad_store import write_small_store

    return write_small_store(tmp_path / "r.zarr")


def test_text_that_is_not_utf8_is_a_usage_error_in_the_python_api(tmp_path):
    from engine.errors import UsageError
    from engine.pipeline import run
    from engine.search import search

    store = write_small_store_copy(tmp_path)
    for text in (b"caf\xe9", "caf\udce9"):  # raw bytes, and what os.fsdecode makes of them
        with pytest.raises(UsageError, match="not UTF-8 text"):
            search(store, text=text)
        with pytest.raises(UsageError, match="not UTF-8 text"):
            search(store, like=text)
        with pytest.raises(UsageError, match="not UTF-8 text"):
            run(
                [tmp_path],
                tmp_path / "out.zarr",
                queries=["fine", text],
                heads=["classify"],
                backend="torch",
                workers=0,
            )
    assert not (tmp_path / "out.zarr").exists()
    assert [h.series_key for h in search(store, like=b"s1", k=1)] == ["s2"]  # UTF-8 bytes are text
