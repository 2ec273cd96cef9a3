"""Point mrfm at hostile output folders, tampered stores, a full disk and hostile signals, and show
what became of every case.

    python examples/hostile_outputs.py [OUTDIR]

The archive cases live in examples/hostile_archive.py; these are the cases around it. Each runs
``mrfm`` as a user would (a subprocess) inside a sandbox folder and prints one row: the exit code
and the expected one, whether a traceback was shown, the peak RSS (from wait4), the files written
or changed in the sandbox outside the command's output folder (a before/after listing), and, for
runs, whether a rerun left a store that validates and equals a clean run. Exit status: 0 when
every case ended as expected, wrote nothing outside its folder and showed no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

HEADS = [
    "--heads",
    "classify,segment",
    "--backend",
    "torch",
    "--workers",
    "0",
    "--batch-size",
    "1",
]  # batch 1: a rerun batches as the clean run did


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    box = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="mrfm-hostile-outputs-"))
    box.mkdir(parents=True, exist_ok=True)
    archive = write_archive(box / "archive")
    clean = box / "clean.zarr"
    assert mrfm(box, "run", str(archive), "--out", str(clean), *HEADS)[0] == 0
    rows = [case(box, archive, clean) for case in CASES]
    table = Table(title="mrfm around the store: hostile outputs, stores, disks and signals")
    for col in ("case", "exit (expected)", "traceback", "peak RSS MiB", "written outside --out", "store after rerun"):
        table.add_column(col, overflow="fold")
    ok = True
    for name, code, want, tb, rss, outside, after in rows:
        good = code in want and not tb and not outside and after in ("", "valid, equal to a clean run")
        ok &= good
        table.add_row(
            Text(name),
            Text(f"{code} ({'/'.join(map(str, want))})", style="green" if good else "red"),
            "yes" if tb else "no",
            f"{rss:.0f}",
            Text(", ".join(outside) or "none"),
            Text(after),
        )
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    print(f"sandbox: {box}")
    return 0 if ok else 1


def write_archive(folder: Path) -> Path:
    from engine.synthetic.small_archive import write_small_archive

    return folder if folder.exists() else write_small_archive(folder, seed=7, name="out", series=2)


def mrfm(
    box: Path, *args: str | bytes, env: dict[str, str] | None = None, term_at: str | None = None
) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, peak RSS in MiB) of one ``mrfm`` command run in ``box``."""
    extra = {"MRFM_PAUSE_AT": f"{term_at}:30"} if term_at else {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", *args],
        cwd=box,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {}), **extra},
    )
    err = b""
    if term_at:
        for line in proc.stderr:
            err += line
            if line.strip() == f"paused at {term_at}".encode():
                proc.send_signal(signal.SIGTERM)
                break
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))
    reader.start()
    rest = proc.stderr.read()
    reader.join()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, (b"".join(chunks) + err + rest).decode(errors="replace"), usage.ru_maxrss / 1024


def listing(box: Path, skip: list[Path]) -> dict[str, str]:
    out = {}
    for p in box.rglob("*"):
        if any(p == s or s in p.parents for s in skip) or not p.is_file():
            continue
        out[str(p.relative_to(box))] = hashlib.blake2b(p.read_bytes(), digest_size=8).hexdigest()
    return out


def outside(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in after if before.get(k) != after[k]) + sorted(f"-{k}" for k in before if k not in after)


def rerun_equal(box: Path, archive: Path, out: Path, clean: Path) -> str:
    from engine.validate import validate_store

    code, text, _ = mrfm(box, "run", str(archive), "--out", str(out), *HEADS)
    if code != 0:
        return f"rerun exit {code}"
    problems = validate_store(out, deep=True)
    if problems:
        return f"invalid: {problems[0]}"
    return "valid, equal to a clean run" if snapshot(out) == snapshot(clean) else "differs from a clean run"


def snapshot(path: Path) -> dict[str, object]:
    import zarr

    volatile = {"run_id", "written", "timings", "seconds"}
    root = zarr.open_group(str(path), mode="r")
    out: dict[str, object] = {}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in volatile}
        return [strip(v) for v in value] if isinstance(value, list) else value

    def walk(group, prefix):
        out[prefix] = json.dumps(strip(dict(group.attrs)), sort_keys=True, default=str)
        for name, arr in group.arrays():
            out[f"{prefix}/{name}"] = np.asarray(arr[...]).tobytes()
        for name, sub in group.groups():
            walk(sub, f"{prefix}/{name}")

    walk(root["series"], "series")
    return out


def _run_case(name, want, prepare=None, env=None, term_at=None, rerun=True, extra=()):
    def case(box: Path, archive: Path, clean: Path):
        out = box / f"{name}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        if prepare:
            prepare(out)
        before = listing(box, [out])
        heads = HEADS[2:] if "--heads" in extra else HEADS  # the case's own --heads replaces the usual one
        code, text, rss = mrfm(box, "run", str(archive), "--out", str(out), *heads, *extra, env=env, term_at=term_at)
        moved = outside(before, listing(box, [out]))
        if code == 2 and prepare:  # a refused user folder: it must be exactly as it was
            moved += [f"{out.name}/{k}" for k in outside(user_files, listing(out, []))]
        after = rerun_equal(box, archive, out, clean) if rerun and code != 2 else ""
        return name, code, want, "Traceback" in text, rss, moved, after

    return case


def _user_folder(out: Path) -> None:
    (out / "index").mkdir(parents=True)
    (out / "index" / "notes.txt").write_text("keep")
    user_files.update(listing(out, []))


def _old_empty_lock(out: Path) -> None:
    from engine.store import LOCK_NAME, ResultStore

    ResultStore(out, mode="a")
    (out / LOCK_NAME).write_bytes(b"")
    os.utime(out / LOCK_NAME, (time.time() - 60, time.time() - 60))


def _dangling_lock(out: Path) -> None:
    from engine.store import LOCK_NAME, ResultStore

    ResultStore(out, mode="a")
    (out / LOCK_NAME).symlink_to(out / "nowhere")


def _export_case(name, tamper, fmt, want):
    def case(box: Path, archive: Path, clean: Path):
        store = box / f"{name}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(clean, store)
        tamper(box, store)
        out = box / f"{name}-{fmt}"
        before = listing(box, [out])
        t = time.perf_counter()
        code, text, rss = mrfm(box, "export", str(store), "--format", fmt, "--out", str(out))
        seconds = time.perf_counter() - t
        return name, code, want, "Traceback" in text, rss, outside(before, listing(box, [out])), f"({seconds:.1f} s)"

    return case


def _tampered(case: str):
    """A tamper of engine.synthetic.bad_store's corpus, applied to a copy of the clean store."""
    from engine.synthetic.bad_store import tamper

    return lambda box, store: tamper(store, case)


def _tmpfs_full(box: Path, archive: Path, clean: Path):
    disk = box / "small-disk"
    disk.mkdir(exist_ok=True)
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode
        != 0
    ):
        return "disk full (tmpfs): cannot mount here", 0, (0,), False, 0.0, [], "skipped"
    try:
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 48 * 1024))
        out = disk / "r.zarr"
        before = listing(box, [out])
        code, text, rss = mrfm(box, "run", str(archive), "--out", str(out), *HEADS)
        moved = [k for k in outside(before, listing(box, [out])) if not k.endswith("filler")]
        (disk / "filler").unlink()
        after = rerun_equal(box, archive, out, clean)
        return "disk full (tmpfs, 48 KiB free)", code, (3,), "Traceback" in text, rss, moved, after
    finally:
        subprocess.run(["umount", str(disk)])


user_files: dict[str, str] = {}
NOT_UTF8 = b"caf\xe9"
CASES = [
    _run_case("out is a user folder", (2,), prepare=_user_folder),
    _run_case("out is a user folder, --overwrite", (2,), prepare=_user_folder, extra=("--overwrite",)),
    _export_case("export: head named like a path", _tampered("head_as_path"), "nifti", (1,)),
    _export_case("export: run record root '/'", _tampered("root_slash"), "dicom-seg", (1,)),
    _run_case("disk full mid-series (injected)", (3,), env={"MRFM_DISK_FULL_AT": "mid-series-write:2"}),
    _run_case("disk full writing the lock (injected)", (3,), env={"MRFM_DISK_FULL_AT": "lock-write"}),
    _run_case("disk full writing the index (injected)", (3,), env={"MRFM_DISK_FULL_AT": "index-rebuild"}),
    _tmpfs_full,
    _run_case("empty lock left a minute ago", (0,), prepare=_old_empty_lock),
    _run_case("dangling-symlink lock", (3,), prepare=_dangling_lock, rerun=False),
    _run_case("--query not UTF-8", (2,), extra=("--query", NOT_UTF8)),
    _run_case("--heads ''", (2,), extra=("--heads", "")),
    _run_case("SIGTERM during start-up", (130,), term_at="start-up"),
    _run_case("SIGTERM after the last series", (0,), term_at="run-ended"),
]


if __name__ == "__main__":
    sys.exit(main())
