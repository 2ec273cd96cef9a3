"""The small ones: non-UTF-8 text arguments, an empty --heads, SIGTERM outside the series, and
lock files mrfm did not make (a dangling symlink, an empty leftover)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.errors import StoreError
from engine.store import LOCK_NAME, ResultStore, open_store
from engine.synthetic.small_archive import write_small_archive

RUN = ["--heads", "classify", "--backend", "torch", "--workers", "0"]
BAD_TEXT = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # what Python makes of latin-1 argv bytes


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_small_archive(tmp_path_factory.mktemp("small") / "archive", seed=5, name="small")


def one_line_exit(result, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    # one message (the test console wraps it at 80 columns), no usage text around it
    assert result.output.startswith("error:") and result.output.count("error:") == 1, result.output
    assert needle in " ".join(result.output.split()) and "Usage:" not in result.output, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["search", "STORE", BAD_TEXT],
        ["run", "ARCHIVE", "--out", "OUT", *RUN, "--query", BAD_TEXT],
        ["run", "ARCHIVE", "--out", "OUT", "--heads", BAD_TEXT],
    ],
)
def test_non_utf8_text_arguments_exit_2_with_one_line(args, archive, tmp_path):
    args = [str(archive) if a == "ARCHIVE" else str(tmp_path / "r.zarr") if a in ("OUT", "STORE") else a for a in args]
    one_line_exit(CliRunner().invoke(cli, args), 2, "is not UTF-8 text")
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("heads", ["", ",", " , "])
def test_an_empty_heads_option_is_a_usage_error(heads, archive, tmp_path):
    result = CliRunner().invoke(
        cli, ["run", str(archive), "--out", str(tmp_path / "r.zarr"), "--heads", heads, "--backend", "torch"]
    )
    one_line_exit(result, 2, "--heads names no head")
    assert not (tmp_path / "r.zarr").exists()


# ---- locks mrfm did not make -------------------------------------------------------------------
def test_a_dangling_symlink_lock_is_reported_as_one_and_left_alone(tmp_path):
    store = ResultStore(tmp_path / "r.zarr", mode="a")
    (tmp_path / "r.zarr" / LOCK_NAME).symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="is a symbolic link to .*which does not exist"):
        store.acquire_lock("r1")
    assert os.path.islink(tmp_path / "r.zarr" / LOCK_NAME)
    assert "symbolic link" in store.lock_problem()


def test_an_empty_leftover_lock_is_broken_and_reported_but_a_fresh_one_is_respected(tmp_path, monkeypatch):
    from engine.errors import StoreLocked

    store = ResultStore(tmp_path / "r.zarr", mode="a")
    lock = tmp_path / "r.zarr" / LOCK_NAME
    lock.write_bytes(b"")  # what a full disk left behind before the lock was linked into place
    with pytest.raises(StoreLocked, match="unreadable"):
        store.acquire_lock("r1")  # seconds old: it may be a writer still writing it
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert "the next run breaks it" in store.lock_problem()
    record = store.acquire_lock("r1")
    assert store.lock_notes and "broke an unreadable lock file" in store.lock_notes[0]
    store.release_lock()
    assert record["run_id"] == "r1" and not lock.exists()


# ---- SIGTERM ----------------------------------------------------------------------------------
def _signal_at(point: str, archive: Path, out: Path) -> subprocess.CompletedProcess:
    """Run mrfm paused at ``point``, SIGTERM it there, and return how it ended."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", str(archive), "--out", str(out), *RUN, "--log-json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MRFM_PAUSE_AT": f"{point}:30"},
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip() == f"paused at {point}":
            proc.send_signal(signal.SIGTERM)
            break
    out_text, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_text, "".join(seen) + err)


@pytest.mark.slow
def test_sigterm_during_start_up_exits_130_and_writes_nothing(archive, tmp_path):
    ended = _signal_at("start-up", archive, tmp_path / "r.zarr")
    assert ended.returncode == 130, ended.stderr[-2000:]
    assert "Traceback" not in ended.stderr and "interrupted" in ended.stderr
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.slow
def test_sigterm_after_the_last_series_exits_0_with_the_run_finished(archive, tmp_path):
    ended = _signal_at("run-ended", archive, tmp_path / "r.zarr")
    assert ended.returncode == 0, ended.stderr[-2000:]
    assert "Traceback" not in ended.stderr
    assert [r["status"] for r in open_store(tmp_path / "r.zarr").runs().values()] == ["finished"]
