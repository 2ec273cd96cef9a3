"""Every hostile case around mrfm in one table: decoding bombs and the Deflated series, tampered
stores under every command that reads a store, hostile output folders, exports steered outside
--out, full disks, terminal escapes, and the small command-line cases.

    python examples/hostile_table.py [OUTDIR] [--only decoding,tampered,outputs]

It runs the cases of examples/decoding_bombs.py, examples/hostile_outputs.py and
engine.synthetic.bad_store (their own code, not a copy) and prints, per case: the exit code and
the expected one, whether a traceback was shown, the peak RSS, the files written or changed
outside the case's output folder (a before/after listing of OUTDIR, and of /tmp's top level),
the store after a rerun (valid, equal to a clean run) where a store is involved, and the memory
check: peak RSS <= baseline + 1.2 x the per-series budget, the baseline being the peak RSS of a
clean run of a small archive. Peak RSS of a subprocess is from /usr/bin/time -v or wait4; the
readers of a tampered store run in one child process per case (start-up costs seconds), each
command's peak measured by resetting the child's high-water mark (/proc/self/clear_refs) and
reported as the child's RSS before it plus what it added.
Exit status: 0 when every row holds; 1 otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decoding_bombs as bombs  # noqa: E402
import hostile_outputs as outputs  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from engine.memory_budget import default_max_series_bytes  # noqa: E402
from engine.synthetic.bad_store import READERS, expected_exit, reader_args, write_tampered_stores  # noqa: E402

RAW_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
EQUAL = "valid, equal to a clean run"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--tampered-child":
        return tampered_child(*args[1:])
    only = args[args.index("--only") + 1].split(",") if "--only" in args else None
    args = [a for i, a in enumerate(args) if a != "--only" and (i == 0 or args[i - 1] != "--only")]
    box = (Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="mrfm-hostile-table-"))).resolve()
    box.mkdir(parents=True, exist_ok=True)
    budget = default_max_series_bytes() / 2**20
    obox = box / "outputs"  # the output-folder cases list this folder before and after, archive included
    (obox / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(obox / "tmp")  # mrfm's temporary files: inside a listed folder
    archive = outputs.write_archive(obox / "archive")
    clean = obox / "clean.zarr"
    shutil.rmtree(clean, ignore_errors=True)
    code, _, baseline = outputs.mrfm(obox, "run", str(archive), "--out", str(clean), *outputs.HEADS)
    assert code == 0, "the clean run failed"
    rows: list[dict] = []
    for group, cases in (("decoding", decoding_rows), ("tampered store", tampered_rows), ("outputs", output_rows)):
        if only and group.split()[0] not in only:
            continue
        for row in cases(box, archive, clean):
            row["group"] = group
            rows.append(row)
            print(f"{group}: {row['case']} {row['command']}: exit {row['exit']}", file=sys.stderr, flush=True)
    table = Table(
        title=f"mrfm over every hostile case (baseline {baseline:.0f} MiB, per-series budget {budget:.0f} MiB)"
    )
    for col in (
        "group",
        "case",
        "command",
        "exit (expected)",
        "traceback or raw control chars",
        "peak RSS MiB",
        "<= baseline + 1.2 budget",
        "written outside",
        "store after rerun",
    ):
        table.add_column(col, overflow="fold")
    ok = True
    for r in rows:
        within = r["rss"] is None or r["rss"] <= baseline + 1.2 * budget
        good = (
            (r["want"] is None or r["exit"] in r["want"])
            and not r["traceback"]
            and not r["outside"]
            and within
            and r["after"] in ("-", EQUAL, "valid")
        )
        ok &= good
        want = "any" if r["want"] is None else "/".join(map(str, r["want"]))
        table.add_row(
            r["group"],
            Text(r["case"]),
            Text(r["command"]),
            Text(f"{r['exit']} ({want})", style="green" if good else "red"),
            "yes" if r["traceback"] else "no",
            "-" if r["rss"] is None else f"{r['rss']:.0f}",
            "yes" if within else "NO",
            Text(", ".join(r["outside"]) or "none"),
            Text(r["after"]),
        )
    Console(width=None if sys.stdout.isatty() else 230).print(table)
    print(f"sandbox: {box}")
    return 0 if ok else 1


def tmp_entries() -> set[str]:
    """/tmp's top level (anything mrfm wrote there by a literal path; its temporary files go to
    TMPDIR, set inside the sandbox, where the sandbox listing sees them)."""
    try:
        return set(os.listdir("/tmp"))
    except OSError:
        return set()


def new_in_tmp(before: set[str]) -> list[str]:
    """Entries of /tmp that appeared since ``before`` and are still there a moment later: other
    programs on a shared machine make and remove temporary folders all the time."""
    time.sleep(1.0)
    return [f"/tmp/{n}" for n in sorted(tmp_entries() - before) if os.path.lexists(f"/tmp/{n}")]


def decoding_rows(box: Path, archive: Path, clean: Path):
    out = box / "bombs"
    cases = bombs.write_bad_inputs(out / "corpus", seed=0, cases=bombs.CASES)
    for case, folder in cases.items():
        store = out / "stores" / f"{case}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        before = tmp_entries()
        row = bombs.attack(["run", str(folder), "--out", str(store), *bombs.RUN], out, store)
        valid, equal = bombs.rerun_checks(folder, store, out / "stores" / f"{case}-clean.zarr", bombs.RUN)
        want = (2,) if case == "deflated_bomb" else (0, 1)  # the bomb is skipped at scan: no series left to run
        yield _bomb_row(case, "run", row, want, before, EQUAL if valid and equal else f"valid {valid}, equal {equal}")
    for case, command, want in (
        ("deflated_bomb", ["scan", "--json", str(cases.get("deflated_bomb", out))], (0,)),
        ("report /dev/zero", ["search", str(clean), "--report", "/dev/zero"], (2,)),
        ("job /dev/zero", ["run", "--job", "/dev/zero"], (2,)),
    ):
        before = tmp_entries()
        yield _bomb_row(case, command[0], bombs.attack(command, out, None), want, before, "-")


def _bomb_row(case: str, command: str, row: dict, want: tuple[int, ...], tmp_before: set[str], after: str) -> dict:
    outside = [] if row["outside"] == "none" else [row["outside"]]
    outside += new_in_tmp(tmp_before)
    rss = float(row["rss"]) if row["rss"] != "?" else None
    return {
        "case": case,
        "command": command,
        "exit": row["rc"],
        "want": want,
        "traceback": row["traceback"],
        "rss": rss,
        "outside": outside,
        "after": after,
    }


def tampered_rows(box: Path, archive: Path, clean: Path):
    stores = write_tampered_stores(box / "tampered")
    for case, store in stores.items():
        before = tmp_entries()
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--tampered-child",
                case,
                str(store),
                str(box / "tampered-out" / case),
                str(archive),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            yield {
                "case": case,
                "command": "(child)",
                "exit": done.returncode,
                "want": (0,),
                "traceback": "Traceback" in done.stderr,
                "rss": None,
                "outside": [],
                "after": bombs.last_line(done.stderr),
            }
            continue
        new_tmp = new_in_tmp(before)
        for i, got in enumerate(lines):
            yield {
                "case": case,
                "command": got["command"],
                "exit": got["exit"],
                "want": (expected_exit(case, got["command"]),),
                "traceback": got["traceback"] or got["raw"],
                "rss": got["rss"],
                "outside": got["outside"] + (new_tmp if i == 0 else []),
                "after": got["after"],
            }


def tampered_child(case: str, store_arg: str, out_arg: str, archive_arg: str) -> int:
    """Each reader on one tampered store, in this process: one JSON line per command."""
    from click.testing import CliRunner

    from engine.cli import cli

    store, out, archive = Path(store_arg), Path(out_arg), Path(archive_arg)
    shutil.rmtree(out, ignore_errors=True)
    folder = store.parent
    for command in READERS:
        target = store
        if command == "run":  # the run writes into the store: its own copy
            target = store.with_name(f"{case}-run.zarr")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(store, target)
        where = out / command.replace(" ", "-")
        before = outputs.listing(folder, [target])
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        result = CliRunner().invoke(cli, reader_args(command, target, where, archive))
        peak = _status("VmHWM")
        moved = outputs.outside(before, outputs.listing(folder, [target]))
        after = "-"  # the corpus's series are not in the archive: a rerun cannot redo them
        tb = result.exception is not None and not isinstance(result.exception, SystemExit)
        print(
            json.dumps(
                {
                    "command": command,
                    "exit": result.exit_code,
                    "traceback": tb or "Traceback" in result.output,
                    "raw": bool(RAW_CONTROL.search(result.output)),
                    "rss": peak,
                    "outside": moved,
                    "after": after,
                }
            ),
            flush=True,
        )
    return 0


def _status(field: str) -> float:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1)) / 1024


def output_rows(box: Path, archive: Path, clean: Path):
    for case in outputs.CASES:
        before = tmp_entries()
        name, code, want, tb, rss, moved, after = case(clean.parent, archive, clean)
        moved = list(moved) + new_in_tmp(before)
        yield {
            "case": name,
            "command": "export" if name.startswith("export") else "run",
            "exit": code,
            "want": want,
            "traceback": tb,
            "rss": rss or None,
            "outside": moved,
            "after": after if after not in ("", "skipped") and not after.startswith("(") else "-",
        }


if __name__ == "__main__":
    sys.exit(main())
