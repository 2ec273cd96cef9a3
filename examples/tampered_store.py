"""Point mrfm's store readers at the tampered-store corpus and tabulate what each did.

    python examples/tampered_store.py [OUTDIR]

Writes ``engine.synthetic.bad_store``'s cases (a small valid store, then one tampered copy per
case) to ``OUTDIR`` and runs ``inspect``, ``validate``, ``search --like`` and ``export --format
table`` on each, in a subprocess. One row per case and command: exit code, whether a traceback
was printed, whether a raw control character (ESC, BEL, C1) reached stdout/stderr, the peak RSS
of the process (``os.wait4``), the seconds it took, and files created outside the store and the
export folder (a before/after listing of OUTDIR). Exit status 1 when any row shows a traceback,
a raw control character, a file outside, or a peak RSS over 1 GiB.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine.synthetic.bad_store import CASES, write_tampered_stores

TIMEOUT_S = 300
RSS_LIMIT_MIB = 1024
RAW_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def commands(store: Path, exports: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(store)],
        "validate": ["validate", str(store)],
        "search": ["search", str(store), "--like", "s1", "-k", "2"],
        "export": ["export", str(store), "--format", "table", "--out", str(exports)],
    }


def measure(args: list[str]) -> dict:
    """Exit code, output, peak RSS (MiB, from os.wait4) and seconds of ``python -m engine ARGS``."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine", *args], stdout=log, stderr=log)
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # reaped here, not by Popen, so that wait4 reports the child's own peak
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read().decode(errors="replace")
    return {"exit": proc.returncode, "text": text, "rss": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t}


def listing(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "outdir", nargs="?", type=Path, help="where to write the stores (default: a new temporary folder)"
    )
    out = parser.parse_args(argv).outdir or Path(tempfile.mkdtemp(prefix="mrfm-tampered-"))
    stores = write_tampered_stores(out)
    table = Table(title="mrfm over the tampered-store corpus")
    for column in (
        "case",
        "command",
        "exit",
        "traceback",
        "raw control chars",
        "peak RSS MiB",
        "s",
        "files outside",
        "said",
    ):
        table.add_column(column, overflow="fold")
    bad = False
    for case, store in stores.items():
        for name, args in commands(store, out / "exports" / case).items():
            before = listing(out)
            got = measure(args)
            outside = [
                p
                for p in listing(out) - before
                if not p.is_relative_to(store) and not p.is_relative_to(out / "exports" / case)
            ]
            traceback = "Traceback" in got["text"]
            raw = bool(RAW_CONTROL.search(got["text"]))
            said = " ".join(got["text"].split())[-120:]
            bad |= traceback or raw or bool(outside) or got["rss"] > RSS_LIMIT_MIB
            table.add_row(
                Text(case),
                name,
                str(got["exit"]),
                "yes" if traceback else "no",
                "yes" if raw else "no",
                f"{got['rss']:.0f}",
                f"{got['seconds']:.1f}",
                str(len(outside)),
                Text(RAW_CONTROL.sub("?", said)),
            )
    console = Console(width=None if sys.stdout.isatty() else 220)
    console.print(table)
    for case, what in CASES.items():
        console.print(Text(f"{case}: {what}"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
