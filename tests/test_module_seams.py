"""The seams modules were split at: the store holds its index and checks, a damaged index is a
store error, header errors are typed yet read as before, and moved names import from their old
homes as the same objects."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from engine.cli import cli
from engine.store import OutputArray, ResultStore
from engine.zarr_nodes import write_array
from engine.zarr_text import TEXT_ATTR, encode_text


def _store(path) -> ResultStore:
    """A store of one finished run with two complete series, each with an embedding, indexed."""
    store = ResultStore(path, mode="a")
    with store.lock("r1"):
        store.begin_run("r1", {"started": "x", "model": {"fingerprint": "fp"}})
        for i, key in enumerate(("s1", "s2")):
            emb = np.eye(4, dtype=np.float32)[i]
            out = OutputArray("retrieve", "1", {"name": "embedding", "kind": "embedding", "dtype": "float32"}, emb)
            attrs = {
                "study_uid": "1.2",
                "description": f"T{i}",
                "heads": {"retrieve": {"version": "1", "outputs": ["embedding"], "error": None, "fingerprint": "fp"}},
            }
            store.write_series(key, attrs, [out], "complete")
        assert set(store.indexing.owed) == {"s1", "s2"}  # the rows these writes owe the index
        assert store.update_index() == 2
        store.finish_run("r1", {"finished": "x"})
    return store


def test_the_store_holds_its_index_and_checks_instead_of_mixing_them_in(tmp_path):
    store = _store(tmp_path / "r.zarr")
    assert ResultStore.__mro__ == (ResultStore, object)
    assert store.indexing.store is store and store.checks.store is store and store.locking.store is store
    assert store.indexing.owed == {} and store.index_skipped == []
    assert store.index_view().lookup(["s1", "s2", "s3"]).keys() == {"s1", "s2"}
    assert store.check_series("s1") == [] and store.check_series("nope") == ["series/nope: missing"]


def test_compacting_an_index_whose_columns_disagree_is_a_store_error_not_a_traceback(tmp_path):
    path = tmp_path / "r.zarr"
    _store(path)
    index = zarr.open_group(path / "index", mode="a")
    del index["description"]  # one row short, yet every chunk present and checksummed
    write_array(index, "description", encode_text(["T0"]), dict(TEXT_ATTR), chunk_rows=1024)
    res = CliRunner().invoke(cli, ["store", "compact", str(path)])
    assert res.exit_code == 3, res.output
    assert "index columns of different lengths" in res.output and "Traceback" not in res.output


def test_a_header_without_its_matrix_size_raises_a_typed_error_read_as_before(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    from engine.discover import scan
    from engine.errors import HeaderError, MrfmError

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.Rows, ds.Columns, ds.PixelData
    ds.save_as(tmp_path / "cut.dcm")
    [skipped] = scan([tmp_path], record_paths=True).skipped
    # the reason recorded is the message alone, as when this was a plain ValueError
    assert skipped.reason.startswith("skipped dicom file (incomplete image header: no Rows/Columns (")
    assert "HeaderError" not in skipped.reason
    assert issubclass(HeaderError, MrfmError) and issubclass(HeaderError, ValueError)


@pytest.mark.parametrize(
    "old, new, names",
    [
        ("engine.cli", "engine.store_cli", ["inspect", "validate", "search"]),
        ("engine.cli", "engine.cli_shared", ["console", "err_console", "esc", "styled", "short", "STATUS_STYLE"]),
        ("engine.store", "engine.store_outputs", ["OutputArray"]),
        ("engine.bench", "engine.bench_report", ["format_report"]),
        ("engine.bench", "engine.bench_stages", ["STAGES", "time_stages", "run_mrfm", "peak_rss_mib"]),
        ("engine.bench", "engine.bench_baselines", ["run_monai", "compare_dcm2niix", "validation_series"]),
        ("engine.dicom.frames", "engine.dicom.patient_identifiers", ["PHI_RULE", "REMOVED", "scrub"]),
    ],
)
def test_moved_names_still_import_from_their_old_home_as_the_same_objects(old, new, names):
    before, after = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(before, name) is getattr(after, name), name
