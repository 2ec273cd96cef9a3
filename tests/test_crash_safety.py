"""A run killed at any point, stopped by a signal, or racing a second writer leaves a store that
tells the truth, and the next run makes it equal to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.store import open_store
from engine.synthetic import write_demo_archive
from engine.validate import validate_store

pytestmark = pytest.mark.slow
HEADS = "classify,segment,retrieve"
# what legitimately differs between two runs over the same input
VOLATILE = {"run_id", "written", "timings", "seconds"}


def mrfm(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        **kw,
    )


def run_args(archive: Path, out: Path) -> list[str]:
    return [
        "run",
        str(archive),
        "--out",
        str(out),
        "--heads",
        HEADS,
        "--backend",
        "torch",
        "--workers",
        "0",
        "--batch-size",
        "1",
        "--log-json",
    ]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_demo_archive(tmp_path_factory.mktemp("crash") / "demo", studies=1, seed=11).dicom_root


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    proc = mrfm(*run_args(archive, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def snapshot(path: Path) -> dict[str, object]:
    """Every series' attributes (less run ids and timings) and every array's bytes, plus the index."""
    root = zarr.open_group(str(path), mode="r")
    out: dict[str, object] = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        out[prefix + "@attrs"] = _strip(dict(group.attrs))
        for name, arr in group.arrays():
            out[f"{prefix}/{name}"] = (arr.dtype.str, arr.shape, np.asarray(arr[...]).tobytes())
        for name, sub in group.groups():
            walk(sub, f"{prefix}/{name}")

    walk(root["series"], "series")
    index = root["index"]
    out["index"] = {name: np.asarray(a[...]).tolist() for name, a in index.arrays()}
    return out


def assert_same_store(ours: Path, reference: Path) -> None:
    a, b = snapshot(ours), snapshot(reference)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key] == b[key], key


@pytest.mark.parametrize("point", ["after-discovery", "mid-series-write:2", "between-series:2", "index-rebuild"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(point, archive, reference, tmp_path):
    out = tmp_path / "killed.zarr"
    killed = mrfm(*run_args(archive, out), env={"MRFM_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # the dead run is reported as abandoned, never as running, by a reader
    runs = open_store(out).runs()
    assert [r["status"] for r in runs.values()] == ["abandoned"]

    resumed = mrfm(*run_args(archive, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert validate_store(out, deep=True) == []
    assert_same_store(out, reference)
    statuses = [r["status"] for r in open_store(out).runs().values()]
    assert statuses == ["abandoned", "finished"]


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    t = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t < timeout, f"{path} never appeared"
        time.sleep(0.1)


def test_a_second_writer_is_refused_with_exit_3_and_the_store_stays_valid(archive, reference, tmp_path):
    out = tmp_path / "shared.zarr"
    first = subprocess.Popen(
        [sys.executable, "-m", "engine", *run_args(archive, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MRFM_PAUSE_AT": "after-discovery:8"},
    )
    try:
        _wait_for(out / ".mrfm-lock")
        second = mrfm(*run_args(archive, out))
        assert second.returncode == 3, second.stderr[-2000:]
        assert str(first.pid) in second.stderr and "Traceback" not in second.stderr
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert validate_store(out, deep=True) == []
    assert_same_store(out, reference)


def test_sigint_finishes_the_series_in_flight_marks_the_run_interrupted_and_exits_130(archive, reference, tmp_path):
    out = tmp_path / "stopped.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", *run_args(archive, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MRFM_PAUSE_AT": "series-loaded:4"},
    )
    # wait for the first finished series, then interrupt while the next one is paused after loading
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if '"event": "series"' in line:
            proc.send_signal(signal.SIGINT)
            break
    rest_out, rest_err = proc.communicate(timeout=600)
    assert proc.returncode == 130, "".join(seen) + rest_err[-2000:]
    store = open_store(out)
    assert [r["status"] for r in store.runs().values()] == ["interrupted"]
    statuses = [a["status"] for _, a in store.iter_series()]
    assert statuses and all(s == "complete" for s in statuses)  # nothing half-written
    assert len(statuses) < len(list(open_store(reference).iter_series()))
    assert validate_store(out) == []
    resumed = mrfm(*run_args(archive, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_store(out, reference)


def test_damage_is_reported_by_validate_and_repaired_by_the_next_run(archive, reference, tmp_path):
    import shutil

    out = tmp_path / "damaged.zarr"
    shutil.copytree(reference, out)
    keys = sorted(p.name for p in (out / "series").iterdir() if p.is_dir())
    assert len(keys) >= 3
    flipped = next((out / "series" / keys[0] / "segment" / "anatomy").rglob("c/*/*/*"))
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside a mask chunk
    flipped.write_bytes(bytes(raw))
    meta = out / "series" / keys[1] / "zarr.json"
    meta.write_text(meta.read_text()[:50])  # truncated group metadata
    deleted = next((out / "series" / keys[2] / "segment" / "anatomy").rglob("c/*/*/*"))
    deleted.unlink()

    shallow = mrfm("validate", str(out))
    deep = mrfm("validate", str(out), "--deep")
    assert shallow.returncode == deep.returncode == 1
    for key in keys[1:3]:
        assert key in shallow.stdout, shallow.stdout
    assert all(key in deep.stdout for key in keys[:3]), deep.stdout
    assert "Traceback" not in deep.stdout + deep.stderr

    repaired = mrfm(*run_args(archive, out))
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert validate_store(out, deep=True) == []
    assert_same_store(out, reference)
