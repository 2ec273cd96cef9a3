"""A full disk is an expected error: exit 3 with "no space left on the device holding STORE", no
traceback, no empty lock or temporary file left behind, the series in flight left incomplete,
the run marked interrupted where that still fits, and a rerun after freeing space equal to a
clean run. Faults are injected at each kind of write (engine.faults, works everywhere) and, where
the machine allows mounting, a real small tmpfs is filled."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine.faults
from engine.cli import cli
from engine.export import MANIFEST, export
from engine.store import LOCK_NAME, open_store
from engine.synthetic.small_archive import write_small_archive
from engine.validate import validate_store
from test_crash_safety import assert_same_store

RUN = ["--heads", "classify,segment", "--backend", "torch", "--workers", "0", "--batch-size", "1"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Two small series (the fault can hit the second while the first is written)."""
    return write_small_archive(tmp_path_factory.mktemp("full") / "archive", seed=4, name="full", series=2)


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full-ref") / "ref.zarr"
    result = CliRunner().invoke(cli, ["run", str(archive), "--out", str(out), *RUN])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def fault(monkeypatch):
    """Set MRFM_DISK_FULL_AT for one command, counting its points afresh."""

    def arm(point: str | None) -> None:
        monkeypatch.setattr(engine.faults, "_counts", {})
        if point:
            monkeypatch.setenv("MRFM_DISK_FULL_AT", point)
        else:
            monkeypatch.delenv("MRFM_DISK_FULL_AT", raising=False)

    return arm


def mrfm(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_disk_full(result, where: Path) -> None:
    assert result.exit_code == 3, result.output
    text = result.output.replace("\n", "")  # the terminal console wraps long lines
    assert f"no space left on the device holding {where}" in text, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(LOCK_NAME))


# (point, run status left, series statuses left)
CASES = [
    ("lock-write", None, []),
    ("run-record", None, []),
    ("mid-series-write:2", "interrupted", ["complete", "incomplete"]),
    ("index-rebuild", "interrupted", ["complete", "complete"]),
    ("run-end", "abandoned", ["complete", "complete"]),  # the interrupted mark is that same write
]


@pytest.mark.parametrize("point, run_status, statuses", CASES, ids=[c[0] for c in CASES])
def test_a_full_disk_anywhere_exits_3_and_a_rerun_equals_a_clean_run(
    point, run_status, statuses, archive, reference, tmp_path, fault
):
    out = tmp_path / "r.zarr"
    fault(point)
    assert_disk_full(mrfm("run", str(archive), "--out", str(out), *RUN), out)
    fault(None)
    assert leftovers(out) == []  # no lock, empty or not, and no temporary file
    store = open_store(out)
    assert [r["status"] for r in store.runs().values()] == ([run_status] if run_status else [])
    assert sorted(a["status"] for _, a in store.iter_series()) == statuses
    again = mrfm("run", str(archive), "--out", str(out), *RUN)
    assert again.exit_code == 0, again.output
    assert validate_store(out, deep=True) == []
    assert_same_store(out, reference)


def test_a_full_disk_during_export_exits_3_and_leaves_no_temporary_file(reference, tmp_path, fault):
    out = tmp_path / "nifti"
    fault("export-write:2")  # the folder's first manifest fits, the first series does not
    assert_disk_full(mrfm("export", str(reference), "--format", "nifti", "--out", str(out)), out)
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    fault(None)
    assert export(reference, "nifti", out).counts == {"exported": 2}
    assert (out / MANIFEST).exists()


# ---- a real full disk ------------------------------------------------------------------------
def _mount_tmpfs(where: Path, size: str) -> str | None:
    """None when mounted, else why not (not root, no mount privilege in this container, ...)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and mount(8)"
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    why = _mount_tmpfs(mount, "2m")
    if why:
        pytest.skip(why)
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill the disk up to ``leave`` bytes free; returns the filler file."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


@pytest.mark.parametrize("free_kib", [0, 16, 20, 48, 64, 96])
def test_a_really_full_disk_exits_3_and_the_rerun_after_freeing_space_completes(
    free_kib, small_disk, archive, reference
):
    out = small_disk / "r.zarr"
    filler = _fill(small_disk, free_kib * 1024)
    result = mrfm("run", str(archive), "--out", str(out), *RUN)
    assert_disk_full(result, out)
    assert not (out / LOCK_NAME).exists()
    store = open_store(out) if (out / "zarr.json").exists() else None
    runs = [r["status"] for r in store.recorded_runs().values()] if store else []
    series = sorted(a["status"] for _, a in store.iter_series()) if store else []
    # the series in flight stays incomplete, the others complete; the run record (if its first
    # write fitted) says interrupted: the space held beside the lock is freed for that write
    assert series == [] or (series.count("incomplete") == 1 and set(series) <= {"complete", "incomplete"}), series
    assert runs == (["interrupted"] if series else runs) and runs in ([], ["interrupted"]), runs
    filler.unlink()
    again = mrfm("run", str(archive), "--out", str(out), *RUN)
    assert again.exit_code == 0, again.output
    assert validate_store(out, deep=True) == []
    assert_same_store(out, reference)
