"""The index that keeps a large store fast: appended rows, the status table, triage from the
index, staleness after a crash, compaction and stats."""

from __future__ import annotations

import numpy as np
import pytest

import engine.store_index as index_mod
from engine.search import search
from engine.store import OutputArray, ResultStore, open_store
from engine.store_cli import compact_store, store_stats
from engine.validate import validate_store

FP = "sha256:" + "0" * 64
DECL = {"name": "embedding", "kind": "embedding", "dtype": "float32", "shape": ["D"]}


@pytest.fixture(autouse=True)
def small_thresholds(monkeypatch):
    # appends start past 8 rows, so a dozen series exercise what 10^5 do
    monkeypatch.setattr(index_mod, "SMALL_INDEX", 8)
    monkeypatch.setattr(index_mod, "DELTA_CHUNK", 4)


def put(store: ResultStore, key: str, vec, status: str = "complete", fp: str = FP) -> None:
    heads = {"retrieve": {"version": "1", "outputs": ["embedding"], "error": None, "fingerprint": fp, "run_id": "r"}}
    out = [OutputArray("retrieve", "1", DECL, np.asarray(vec, np.float32) / np.linalg.norm(vec))]
    store.write_series(
        key,
        {"study_uid": f"st-{key}", "description": key, "heads": heads},
        out,
        status,
        reason=None if status == "complete" else "test",
    )


def run(path, run_id: str, writes) -> ResultStore:
    store = ResultStore(path, mode="a")
    with store.lock(run_id):
        store.begin_run(run_id, {"started": "x"})
        for args in writes:
            put(store, *args)
        store.update_index()
        store.finish_run(run_id, {"finished": "x"})
    return store


def index_problems(path, deep: bool = False) -> list[str]:
    """What validate says of the index (these stores' minimal series attrs fail the schema)."""
    return [p for p in validate_store(path, deep=deep) if p.startswith("/index")]


def vec(i: int) -> list[float]:
    return [np.cos(i), np.sin(i), 0.1]


def search_keys(path, key, k=50):
    return [(h.series_key, round(h.score, 5)) for h in search(path, like=key, k=k)]


def test_appended_rows_answer_like_a_rebuilt_index(tmp_path):
    path = tmp_path / "r.zarr"
    run(path, "r1", [(f"s{i:02d}", vec(i)) for i in range(40)])
    store = run(path, "r2", [("s01", vec(99)), ("s02", vec(2), "failed"), ("new", vec(47))])
    attrs = store.index_attrs()
    assert attrs["delta_rows"] == 3 and attrs["base_rows"] == 40 and attrs["count"] == 40
    assert index_problems(path) == []
    appended = search_keys(path, "s05")
    assert open_store(path).summary()["series"] == {"complete": 40, "failed": 1}
    fresh = ResultStore(path, mode="a")
    fresh.rebuild_index()
    assert fresh.index_attrs()["delta_rows"] == 0
    assert search_keys(path, "s05") == appended
    assert "s02" not in dict(appended) and "new" in dict(appended)


def test_triage_answers_from_the_index_without_reading_groups(tmp_path, monkeypatch):
    path = tmp_path / "r.zarr"
    run(path, "r1", [(f"s{i:02d}", vec(i)) for i in range(12)] + [("old", vec(1), "complete", "sha256:" + "1" * 64)])
    store = ResultStore(path, mode="a")
    monkeypatch.setattr(ResultStore, "series_attrs", lambda *a: pytest.fail("read a group"))
    got = store.triage(["s03", "old", "nope"], {"retrieve": FP}, verify="index")
    assert got == {"s03": set(), "old": {"retrieve"}, "nope": {"retrieve"}}


def test_a_run_that_did_not_update_the_index_makes_it_stale(tmp_path):
    path = tmp_path / "r.zarr"
    run(path, "r1", [(f"s{i:02d}", vec(i)) for i in range(12)])
    crashed = ResultStore(path, mode="a")
    crashed.begin_run("r2", {"started": "x"})  # killed before update_index
    put(crashed, "s01", vec(1), "failed")
    reader = open_store(path)
    assert reader.index_view() is None and reader.summary()["source"] == "groups"
    assert reader.summary()["series"] == {"complete": 11, "failed": 1}
    after = run(path, "r3", [])
    assert after.index_view() is not None and after.summary()["series"] == {"complete": 11, "failed": 1}
    assert index_problems(path) == []


def _by_score(hits):
    """Hits best first, ties (equal embeddings) ordered by key: their order is not defined."""
    return sorted(hits, key=lambda hit: (-hit[1], hit[0]))


def test_compact_folds_appended_rows_and_stats_report_the_store(tmp_path):
    path = tmp_path / "r.zarr"
    run(path, "r1", [(f"s{i:02d}", vec(i)) for i in range(40)])
    run(path, "r2", [("s01", vec(5)), ("x", vec(41))])
    before = search_keys(path, "s07")
    report = compact_store(str(path))
    assert report["delta_rows"] == 2 and report["rows"] == 41 and report["rebuilt"] == 0
    assert open_store(path).index_attrs()["delta_rows"] == 0 and _by_score(search_keys(path, "s07")) == _by_score(
        before
    )
    stats = store_stats(str(path), sample=5)
    assert stats["series"] == {"complete": 41} and stats["index"]["rows"] == 41 and stats["runs"] == 2
    assert stats["per_series"]["sampled"] == 5 and stats["per_series"]["files"] > 0
    assert index_problems(path, deep=True) == []


def test_rows_written_by_another_process_are_noted_not_rebuilt(tmp_path, monkeypatch):
    path = tmp_path / "r.zarr"
    run(path, "r1", [(f"s{i:02d}", vec(i)) for i in range(40)])
    driver = ResultStore(path, mode="a")
    with driver.lock("r2"):
        driver.begin_run("r2", {"started": "x"})
        put(ResultStore(path, mode="a"), "w1", vec(11))  # a worker's own store object
        driver.note_series(["w1"])
        monkeypatch.setattr(ResultStore, "rebuild_index", lambda *a, **k: pytest.fail("rebuilt"))
        assert driver.update_index() == 41
        driver.finish_run("r2", {"finished": "x"})
    assert "w1" in dict(search_keys(path, "s00"))


def _index_arrays(path) -> dict[str, np.ndarray]:
    root = open_store(path).root
    out = {}

    def walk(group, prefix):
        for name, arr in group.arrays():
            out[f"{prefix}{name}"] = np.asarray(arr[...])
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(root["index"], "")
    return out


def test_the_first_index_of_a_fresh_store_is_built_from_memory_and_equals_a_rebuild(tmp_path, monkeypatch):
    path = tmp_path / "r.zarr"
    writes = [(f"s{i:02d}", vec(i)) for i in range(12)] + [("bad", vec(5), "failed")]
    with monkeypatch.context() as m:
        m.setattr(ResultStore, "rebuild_index", lambda *a, **k: pytest.fail("a fresh store's groups were walked"))
        run(path, "r1", writes)
    from_memory = _index_arrays(path)
    ResultStore(path, mode="a").rebuild_index()
    rebuilt = _index_arrays(path)
    assert sorted(from_memory) == sorted(rebuilt)
    for name, arr in rebuilt.items():
        assert np.array_equal(from_memory[name], arr), name
    assert index_problems(path, deep=True) == []


def test_a_store_with_groups_of_an_earlier_run_and_no_index_is_rebuilt(tmp_path):
    path = tmp_path / "r.zarr"
    run(path, "r1", [(f"s{i:02d}", vec(i)) for i in range(3)])
    import shutil

    shutil.rmtree(path / "index")  # the index of r1 is lost
    run(path, "r2", [("new", vec(9))])
    assert set(dict(search_keys(path, "new"))) == {"s00", "s01", "s02"}  # every group, not only r2's
