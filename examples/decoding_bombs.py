"""What mrfm does with each decoding attack: a table of exit code, traceback, peak RSS, files
written outside the output folder, and whether the store is valid after a rerun and equal to a
clean run.

    python examples/decoding_bombs.py [OUTDIR] [--max-series-bytes SIZE]

Writes the decoding cases of the hostile corpus (``engine.synthetic.bad_decoding``) under
``OUTDIR/corpus`` and, for each, runs ``mrfm run CASE --out OUTDIR/stores/CASE.zarr`` under
``/usr/bin/time -v`` (peak RSS is its "Maximum resident set size"), lists every file under
OUTDIR and the temporary folder before and after, runs it again (resume) and runs it into a
second, clean store, then ``mrfm validate`` on the rerun store and compares the two stores'
series (status and reason). The same is done for ``mrfm scan`` of the Deflated bomb, and for
``mrfm search --report /dev/zero`` and ``mrfm run --job /dev/zero``.
Exit status: 0 when no case printed a traceback, wrote outside its output folder or left an
invalid or unequal store; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import engine
from engine.synthetic.bad_decoding import __doc__ as _cases_doc
from engine.synthetic.bad_inputs import write_bad_inputs

CASES = re.findall(r"^- ``([a-z0-9_]+)``", _cases_doc or "", re.M)
RUN = ["--heads", "classify", "--workers", "0", "--backend", "torch"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path)
    parser.add_argument("--max-series-bytes", help="passed to mrfm run (default: mrfm's own)")
    args = parser.parse_args(argv)
    out = (args.outdir or Path(tempfile.mkdtemp(prefix="mrfm-bombs-"))).resolve()
    cases = write_bad_inputs(out / "corpus", seed=0, cases=CASES)
    budget = ["--max-series-bytes", args.max_series_bytes] if args.max_series_bytes else []
    table = Table(title=f"decoding attacks (budget: {args.max_series_bytes or 'default'})")
    for col in (
        "case",
        "command",
        "exit",
        "traceback",
        "peak RSS MiB",
        "written outside",
        "rerun valid",
        "= clean run",
        "reason",
    ):
        table.add_column(col, overflow="fold")
    bad = False
    for case, folder in cases.items():
        store = out / "stores" / f"{case}.zarr"
        row = attack(["run", str(folder), "--out", str(store), *RUN, *budget], out, store)
        rerun_ok, equal = rerun_checks(folder, store, out / "stores" / f"{case}-clean.zarr", RUN + budget)
        reason = reason_of(store, row["stderr"])
        table.add_row(
            case,
            "run",
            str(row["rc"]),
            yesno(row["traceback"]),
            row["rss"],
            row["outside"],
            yesno(rerun_ok),
            yesno(equal),
            reason,
        )
        bad |= row["traceback"] or row["outside"] != "none" or not rerun_ok or not equal
    extra = [
        ("deflated_bomb", ["scan", "--json", str(cases.get("deflated_bomb", out)), *budget]),
        ("report /dev/zero", ["search", str(out / "stores" / "deflated_valid.zarr"), "--report", "/dev/zero"]),
        ("job /dev/zero", ["run", "--job", "/dev/zero"]),
    ]
    for case, command in extra:
        row = attack(command, out, None)
        table.add_row(
            case,
            command[0],
            str(row["rc"]),
            yesno(row["traceback"]),
            row["rss"],
            row["outside"],
            "-",
            "-",
            skipped_reason(row["stdout"]) or last_line(row["stderr"]),
        )
        bad |= row["traceback"] or row["outside"] != "none"
    Console(width=None if sys.stdout.isatty() else 220).print(table)
    return 1 if bad else 0


def attack(args: list[str], out: Path, store: Path | None) -> dict:
    """Run mrfm with its own temporary folder and working folder under ``out``, so that anything
    it writes outside ``store`` shows in the listing (and other programs' files do not)."""
    scratch, cwd = out / "tmp", out / "cwd"
    scratch.mkdir(exist_ok=True)
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    before = listing(out, store)
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
        env=env,
    )
    after = listing(out, store)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    new = sorted(after - before)
    return {
        "rc": done.returncode,
        "traceback": "Traceback" in done.stdout + done.stderr,
        "stdout": done.stdout,
        "rss": f"{int(peak.group(1)) / 1024:.0f}" if peak else "?",
        "stderr": done.stderr,
        "outside": ", ".join(new[:3]) + (" ..." if len(new) > 3 else "") if new else "none",
    }


def listing(out: Path, store: Path | None) -> set[str]:
    """Every file under ``out`` (the corpus, the other stores, mrfm's TMPDIR and working folder)
    but not in ``store``, with its size and modification time, so a rewritten file counts."""
    found = set()
    for path in out.rglob("*"):
        try:
            if store is not None and (path == store or store in path.parents):
                continue
            info = path.stat()
        except OSError:
            continue
        if path.is_file():
            found.add(f"{path.relative_to(out)} {info.st_size}")
    return found


def rerun_checks(folder: Path, store: Path, clean: Path, run_args: list[str]) -> tuple[bool, bool]:
    subprocess.run(
        [sys.executable, "-m", "engine", "run", str(folder), "--out", str(store), *run_args],
        capture_output=True,
        timeout=900,
    )
    if not (store / "zarr.json").exists():  # nothing to run: no store is the right outcome
        return True, True
    valid = (
        subprocess.run(
            [sys.executable, "-m", "engine", "validate", str(store)], capture_output=True, timeout=900
        ).returncode
        == 0
    )
    shutil.rmtree(clean, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "engine", "run", str(folder), "--out", str(clean), *run_args],
        capture_output=True,
        timeout=900,
    )
    return valid, series_of(store) == series_of(clean)


def series_of(store: Path) -> dict[str, tuple]:
    if not (store / "zarr.json").exists():
        return {}
    return {key: (a.get("status"), a.get("reason")) for key, a in engine.open_store(store).iter_series()}


def reason_of(store: Path, stderr: str) -> str:
    reasons = [str(r) for _, r in series_of(store).values() if r]
    return (reasons[0] if reasons else last_line(stderr))[:160]


def skipped_reason(stdout: str) -> str:
    """The first skipped file's kind and reason from ``mrfm scan --json``."""
    try:
        skipped = json.loads(stdout).get("skipped") or []
    except ValueError:
        return ""
    return f"skipped ({skipped[0]['kind']}): {skipped[0]['reason']}"[:160] if skipped else ""


def last_line(text: str) -> str:
    """The command's own last message (mrfm's 'error: ...' line, else its last warning)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("\t")]
    errors = [ln for ln in lines if ln.startswith(("error", "Error", "Usage"))]
    warnings = [m.group(1) for ln in lines for m in [re.search(r'"message": "(.*?)"', ln)] if m]
    return ((errors or warnings or [""])[-1])[:160]


def yesno(flag: bool) -> str:
    return "yes" if flag else "no"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
