"""`mrfm bench` report structure (no timing thresholds: the machine is shared), and the
incremental index update the run's write stage relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.bench import STAGES, format_report, run_bench
from engine.zarr_text import decode_text


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_bench(
        1, heads=["classify"], all_heads=False, repeats=1, workers=0, dicom=[], workdir=tmp_path_factory.mktemp("bench")
    )


def test_report_has_every_stage_with_positive_throughput(report):
    assert list(report["stages"]) == list(STAGES)
    for name, stage in report["stages"].items():
        assert stage["seconds"] >= 0, name
        assert stage["series_per_s"] is None or stage["series_per_s"] > 0, name


def test_end_to_end_and_overlap_are_sane(report):
    e = report["end_to_end"]
    assert e["series"] >= 1 and e["series_per_s"] > 0 and e["overlap_efficiency"] > 0
    assert e["slowest_stage"] in STAGES
    assert 0 <= e["write_share"] < 1 and 0 < e["write_cost_share"] < 1
    assert report["peak_rss_mib"]["self"] > 0


def test_baselines_report_a_ratio_or_not_installed(report):
    [cmp] = report["monai"]
    if cmp["monai"]["status"] == "ok":
        assert cmp["speedup"] > 0 and cmp["monai"]["series"] == cmp["mrfm"]["series"]
    else:
        assert cmp["monai"]["status"] == "not installed"
    assert report["dcm2niix"]["status"] in ("ok", "not installed", "no validation series found")
    text = format_report(report)
    assert "series/s" in text and "overlap efficiency" in text


def test_incremental_index_equals_a_rebuild(tmp_path):
    from engine.store import OutputArray, ResultStore

    decl = {"name": "embedding", "kind": "embedding", "dtype": "float32", "shape": ["D"]}

    def put(store, key, vec, status="complete"):
        out = [OutputArray("retrieve", "0.1.0", decl, np.asarray(vec, np.float32))]
        heads = {
            "retrieve": {"version": "0.1.0", "outputs": ["embedding"], "error": None, "fingerprint": "f", "run_id": "r"}
        }
        store.write_series(key, {"study_uid": f"st-{key}", "description": key, "heads": heads}, out, status)

    store = ResultStore(tmp_path / "r.zarr", mode="a")
    for i in range(4):
        put(store, f"s{i}", [i, 1.0])
    assert store.update_index() == 4  # first index: built from the groups
    second = ResultStore(tmp_path / "r.zarr", mode="a")
    put(second, "s1", [9.0, 9.0])  # replaced
    put(second, "s5", [5.0, 5.0])  # added
    put(second, "s2", [0.0, 0.0], status="failed")  # removed
    assert second.update_index() == 4
    incremental = {k: second.root["index"][k][...] for k in ("series_key", "study_uid", "embedding")}
    second.rebuild_index()
    for k, v in incremental.items():
        np.testing.assert_array_equal(v, second.root["index"][k][...])
    assert decode_text(incremental["series_key"]).tolist() == ["s0", "s1", "s3", "s5"]
    assert math.isclose(float(incremental["embedding"][1][0]), 9.0)
