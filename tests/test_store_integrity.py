"""The store survives a second writer, dead writers, damaged bytes and failed writes: each is
refused, reported by validate, or redone by the next run, and never read back as data."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.errors import StoreError, StoreLocked
from engine.store import LOCK_NAME, OutputArray, ResultStore, now
from engine.validate import validate_store

FP = "sha256:" + "0" * 64
SHAPE = (70, 20, 10)  # masks are chunked by 64: two chunks along the first axis
HEADS = {"segment": "anatomy", "retrieve": "embedding", "classify": "region"}
MASK = "series/s1/segment/anatomy"


def run_info() -> dict:
    return {
        "started": now(),
        "config": {"paths": ["a"], "heads": sorted(HEADS)},
        "model": {"name": "tiny", "fingerprint": FP},
        "heads": {h: {"version": "1"} for h in HEADS},
        "backend": {"name": "torch", "reason": "test"},
        "fingerprint": FP,
        "host": {"hostname": socket.gethostname(), "python": "3", "torch": "0"},
    }


def series_attrs(key: str, run_id: str) -> dict:
    return {
        "series_key": key,
        "study_uid": "1.2",
        "series_uid": key,
        "description": "T1",
        "reader": "dicom",
        "source": {"first": "a.dcm", "count": 10},
        "run_id": run_id,
        "fingerprint": FP,
        "geometry": {
            "shape": list(SHAPE),
            "affine": np.diag([1.0, 1.0, 2.0, 1.0]).tolist(),
            "spacing": [1.0, 1.0, 2.0],
            "orientation": "axial",
        },
        "heads": {
            h: {"version": "1", "outputs": [o], "error": None, "fingerprint": FP, "run_id": run_id}
            for h, o in HEADS.items()
        },
    }


def outputs(mask: np.ndarray | None = None, seed: int = 0) -> list[OutputArray]:
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 3, SHAPE).astype(np.uint8) if mask is None else mask
    emb = rng.normal(size=8).astype(np.float32)
    return [
        OutputArray("segment", "1", {"name": "anatomy", "kind": "mask", "labels": ["bg", "a", "b"]}, mask),
        OutputArray(
            "retrieve",
            "1",
            {"name": "embedding", "kind": "embedding", "dtype": "float32", "normalized": True},
            emb / np.linalg.norm(emb),
        ),
        OutputArray(
            "classify",
            "1",
            {"name": "region", "kind": "scores", "dtype": "float32", "labels": ["x", "y"]},
            np.array([0.2, 0.8]),
        ),
    ]


def write(store: ResultStore, key: str, run_id: str = "r1", replace: bool = False, **kw) -> None:
    store.write_series(key, series_attrs(key, run_id), outputs(**kw), "complete", replace=replace)


@pytest.fixture
def path(tmp_path) -> Path:
    """A valid store: one finished run, two complete series, an index."""
    p = tmp_path / "r.zarr"
    store = ResultStore(p, mode="a")
    with store.lock("r1"):
        store.begin_run("r1", run_info())
        write(store, "s1")
        write(store, "s2", seed=1)
        store.rebuild_index()
        store.finish_run("r1", {"finished": now()})
    assert validate_store(p, deep=True) == []
    return p


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- lock ------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(path):
    first = ResultStore(path, mode="a")
    with first.lock("r2"):
        with pytest.raises(StoreLocked) as err:
            ResultStore(path, mode="a").acquire_lock("r3")
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "run r2" in message
        before = (path / LOCK_NAME).read_text()
        reader = ResultStore(path, mode="r")  # readers never take or touch the lock
        assert reader.runs()["r1"]["status"] == "finished"
        assert (path / LOCK_NAME).read_text() == before
        assert validate_store(path) == []  # a live writer's lock is not a problem
    assert not (path / LOCK_NAME).exists()
    with ResultStore(path, mode="a").lock("r3"):
        pass


def test_a_stale_lock_is_broken_and_its_run_marked_abandoned(path):
    store = ResultStore(path, mode="a")
    pid = dead_pid()
    store.begin_run("dead", {**run_info(), "pid": pid})
    (path / LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": pid, "run_id": "dead", "started": now()})
    )

    reader = ResultStore(path, mode="r")
    assert reader.runs()["dead"]["status"] == "abandoned"  # reported without writing
    assert reader.recorded_runs()["dead"]["status"] == "running"
    problems = validate_store(path)
    assert any(p.startswith(f"/{LOCK_NAME}: stale lock of run dead") for p in problems)
    assert "/runs/dead: left running by a process that is gone (abandoned); the next run marks it" in problems

    with store.lock("r2") as held:
        assert held["pid"] == os.getpid()
        assert json.loads((path / LOCK_NAME).read_text())["run_id"] == "r2"
        assert store.recorded_runs()["dead"]["status"] == "abandoned"
    assert validate_store(path) == []


def test_a_lock_from_another_host_is_never_broken(path):
    (path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "run_id": "far", "started": now()}))
    with pytest.raises(StoreLocked, match=r"host elsewhere.*remove"):
        ResultStore(path, mode="a").acquire_lock("r2")
    assert json.loads((path / LOCK_NAME).read_text())["run_id"] == "far"


def test_runs_end_finished_or_interrupted(path):
    store = ResultStore(path, mode="a")
    with store.lock("r2"):
        store.begin_run("r2", run_info())
        assert store.runs()["r2"]["status"] == "running"
        store.finish_run("r2", {"finished": now()}, status="interrupted")
        with pytest.raises(ValueError):
            store.finish_run("r2", {}, status="done")
    assert store.runs()["r2"]["status"] == "interrupted"
    assert validate_store(path) == []


# ---- damaged chunks --------------------------------------------------------------------------
def test_a_flipped_byte_raises_on_read_and_is_redone(path):
    flip_byte(path / MASK / "c/0/0/0")
    store = ResultStore(path, mode="a")
    with pytest.raises(StoreError, match="segment/anatomy"):
        store.read_output("s1", "segment", "anatomy")
    assert f"/{MASK}/c/0/0/0: checksum mismatch (the chunk's bytes are damaged)" in validate_store(path, deep=True)
    assert any(p.startswith(f"/{MASK}") for p in validate_store(path))  # reading the mask fails too
    assert store.pending_heads("s1", {h: FP for h in HEADS}, deep=True) == set(HEADS)
    assert store.pending_heads("s2", {h: FP for h in HEADS}, deep=True) == set()
    write(store, "s1", replace=True)
    assert validate_store(path, deep=True) == []


def test_a_deleted_chunk_is_found_without_reading_and_resume_redoes_it(path):
    (path / MASK / "c/0/0/0").unlink()  # the mask's one shard
    assert f"/{MASK}/c/0/0/0: chunk missing" in validate_store(path)
    store = ResultStore(path, mode="a")
    assert store.check_series("s1") == [f"{MASK}/c/0/0/0: chunk missing"]
    assert store.pending_heads("s1", {h: FP for h in HEADS}) == set(HEADS)
    write(store, "s1")  # resume: same grid, no replace; the damaged group is rewritten whole
    assert validate_store(path, deep=True) == []


def test_an_all_zero_mask_still_writes_every_chunk(tmp_path):
    store = ResultStore(tmp_path / "z.zarr", mode="a")
    store.begin_run("r1", run_info())
    write(store, "s1", mask=np.zeros(SHAPE, np.uint8))
    chunks = sorted(
        p.relative_to(tmp_path / "z.zarr" / MASK / "c").as_posix()
        for p in (tmp_path / "z.zarr" / MASK / "c").rglob("*")
        if p.is_file()
    )
    assert chunks == ["0/0/0"]  # one shard holding both 64-voxel chunks
    raw = (tmp_path / "z.zarr" / MASK / "c/0/0/0").read_bytes()
    index = np.frombuffer(raw[-(2 * 16 + 4) : -4], dtype="<u8").reshape(2, 2)
    assert (index[:, 1] > 0).all() and (index[:, 0] != np.iinfo(np.uint64).max).all()  # both stored, none empty
    assert store.check_series("s1", deep=True) == []


def test_a_mask_costs_one_file_and_its_chunks_stay_separately_readable(path):
    files = sorted(p.relative_to(path / MASK).as_posix() for p in (path / MASK).rglob("*") if p.is_file())
    assert files == ["c/0/0/0", "zarr.json"]
    meta = json.loads((path / MASK / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [64, 20, 10]  # inner chunks, read one by one
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [128, 20, 10]  # the shard covers the grid
    whole = ResultStore(path, mode="r").read_output("s1", "segment", "anatomy")
    assert np.array_equal(zarr.open_array(path / MASK, mode="r")[64:, 3:7, 2], whole[64:, 3:7, 2])


def test_a_damaged_shard_index_is_found(path):
    f = path / MASK / "c/0/0/0"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # inside the index at the shard's end
    f.write_bytes(bytes(data))
    assert f"/{MASK}/c/0/0/0: checksum mismatch (the shard's index is damaged)" in validate_store(path, deep=True)


def test_every_array_carries_a_crc32c_checksum(path):
    metas = [json.loads(p.read_text()) for p in path.rglob("zarr.json")]
    arrays = [m for m in metas if m["node_type"] == "array"]
    assert len(arrays) >= 9  # three outputs per series and the index columns

    def checksummed(codecs: list) -> bool:
        if codecs[0]["name"] == "sharding_indexed":  # a sharded mask: each inner chunk and the index
            conf = codecs[0]["configuration"]
            return checksummed(conf["codecs"]) and checksummed(conf["index_codecs"])
        return codecs[-1]["name"] == "crc32c"

    assert all(checksummed(m["codecs"]) for m in arrays)
    assert any(m["codecs"][0]["name"] == "sharding_indexed" for m in arrays)


# ---- damaged metadata ------------------------------------------------------------------------
def test_a_truncated_series_group_is_reported_damaged_and_recovered(path):
    meta = path / "series/s1/zarr.json"
    meta.write_text(meta.read_text()[:40])
    store = ResultStore(path, mode="a")
    attrs = dict(store.iter_series())["s1"]
    assert attrs["status"] == "damaged" and attrs["reason"].startswith("series/s1/zarr.json: truncated JSON")
    assert store.summary(from_groups=True)["series"] == {"damaged": 1, "complete": 1}
    assert store.summary()["source"] == "index"  # the index answers inspect; validate finds the damage
    assert any(p.startswith("/series/s1/zarr.json: truncated JSON") for p in validate_store(path))
    assert store.pending_heads("s1", {h: FP for h in HEADS}) == set(HEADS)
    assert store.rebuild_index() == 1  # skips the damaged series, never crashes
    write(store, "s1", replace=True)
    store.rebuild_index()
    assert validate_store(path, deep=True) == []


def test_a_truncated_group_is_recovered_without_replace(path):
    meta = path / "series/s1/segment/zarr.json"
    meta.write_text("{")
    store = ResultStore(path, mode="a")
    assert store.check_series("s1")[0].startswith("series/s1/segment/zarr.json: truncated JSON")
    write(store, "s1")
    assert validate_store(path, deep=True) == []


def test_a_truncated_root_raises_store_error_naming_the_file(path):
    meta = path / "zarr.json"
    meta.write_text(meta.read_text()[:25])
    for mode in ("r", "a"):
        with pytest.raises(StoreError, match=r"zarr\.json: truncated JSON"):
            ResultStore(path, mode=mode)
    problems = validate_store(path)
    assert len(problems) == 1 and "zarr.json: truncated JSON" in problems[0]


# ---- index -----------------------------------------------------------------------------------
def test_a_garbage_index_chunk_is_reported_and_rebuilt(path):
    (path / "index/series_key/c/0/0").write_bytes(os.urandom(64))  # text columns are (rows, width)
    assert any(p.startswith("/index") for p in validate_store(path))
    assert any(p.startswith("/index/series_key/c/0/0: checksum mismatch") for p in validate_store(path, deep=True))
    store = ResultStore(path, mode="a")
    assert store.rebuild_index() == 2
    assert validate_store(path, deep=True) == []


def test_rebuild_skips_a_series_whose_embedding_is_damaged(path):
    flip_byte(path / "series/s2/retrieve/embedding/c/0")
    store = ResultStore(path, mode="a")
    assert store.rebuild_index() == 1
    assert [s.split(":")[0] for s in store.index_skipped] == ["series/s2"]
    assert store.index_attrs()["skipped"] == store.index_skipped


def test_a_kill_during_index_rebuild_leaves_a_store_the_next_run_repairs(path):
    script = textwrap.dedent(f"""
        from engine.store import ResultStore
        from tests.test_store_integrity import run_info
        store = ResultStore({str(path)!r}, mode="a")
        with store.lock("killed"):
            store.begin_run("killed", run_info())
            store.rebuild_index()
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "MRFM_KILL_AT": "index-rebuild"},
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    problems = validate_store(path)
    assert "/index: partial (a rebuild did not finish); the next run rebuilds it" in problems
    assert any(p.startswith(f"/{LOCK_NAME}: stale lock of run killed") for p in problems)
    assert ResultStore(path, mode="r").runs()["killed"]["status"] == "abandoned"

    store = ResultStore(path, mode="a")
    with store.lock("next"):
        store.rebuild_index()
    assert store.recorded_runs()["killed"]["status"] == "abandoned"
    assert validate_store(path, deep=True) == []


# ---- series status ---------------------------------------------------------------------------
def test_a_failed_write_marks_the_series_failed_with_its_reason(path, monkeypatch):
    from zarr.storage import LocalStore

    set_key = LocalStore.set

    async def io_error(self, key, value, *args, **kwargs):  # chunks fail; small metadata writes still work
        if "/c/" in key or key.endswith("/c"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return await set_key(self, key, value, *args, **kwargs)

    # (a full disk instead stops the run and leaves the series incomplete: tests/test_disk_full.py)
    monkeypatch.setattr(LocalStore, "set", io_error)
    store = ResultStore(path, mode="a")
    with pytest.raises(StoreError, match=r"series/s3: could not write series group: .*Input/output error"):
        write(store, "s3")
    monkeypatch.undo()
    attrs = store.series_attrs("s3")
    assert attrs["status"] == "failed"
    assert attrs["reason"].startswith("could not write series group: [Errno 5]")
    assert all(h["error"] for h in attrs["heads"].values())
    assert store.pending_heads("s3", {h: FP for h in HEADS}) == set(HEADS)
    write(store, "s3")
    store.rebuild_index()
    assert validate_store(path, deep=True) == []


def test_a_series_left_incomplete_by_a_dead_run_is_a_problem_and_redone(path):
    g = zarr.open_group(str(path / "series/s1"), mode="r+")
    g.attrs.update({"status": "incomplete"})
    problems = validate_store(path)
    assert "/series/s1: left incomplete by run r1, which is not running; the next run redoes it" in problems
    store = ResultStore(path, mode="a")
    assert store.pending_heads("s1", {h: FP for h in HEADS}) == set(HEADS)
    assert store.summary(from_groups=True)["series"] == {"incomplete": 1, "complete": 1}


def test_a_damaged_series_container_is_reported_and_rewritten_by_a_writer(path):
    (path / "series/zarr.json").write_text('{"zarr_format": 3, "node_ty')
    assert validate_store(path)[0].startswith("/series/zarr.json: truncated JSON")
    store = ResultStore(path, mode="a")
    assert sorted(dict(store.iter_series())) == ["s1", "s2"]
    assert validate_store(path, deep=True) == []
