"""Point mrfm at the hostile-input corpus and show what became of every case.

    python examples/hostile_archive.py [OUTDIR] [--each]

Writes the corpus (``engine.synthetic.bad_inputs``: one folder per bad case) to
``OUTDIR/corpus``, runs ``mrfm run`` over it once (``--heads classify --workers 0``) into
``OUTDIR/results.zarr``, then prints one row per case: what the corpus expects, what the run did
(series status in the store, or a skipped file in the run's warnings) and why. The last lines say
whether any case vanished without a trace and whether the patient's identifiers reached the
store. ``--each`` also runs mrfm on every case alone and adds that run's exit code per case
(0 done, 1 the series failed, 2 nothing to run: every file of the case was skipped).
Exit status: 0 when no case was silently dropped, 1 otherwise.

Series are matched to cases by their description (``BAD <CASE>``), then by their key or series
UID; skipped files by the ``bad_<case>`` folder behind the label each warning names
(``engine.scan(...).locations`` maps labels to paths, without putting paths in the store).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

import engine
from engine.synthetic import derive_uid
from engine.synthetic.bad_inputs import EXPECTED, PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME, write_bad_inputs

SEED = 0
RUN_TIMEOUT_S = 900  # a hang is a finding too: report it instead of waiting forever
REASON_CHARS = 90


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "outdir", nargs="?", type=Path, help="where to write the corpus and the store (default: a new temporary folder)"
    )
    parser.add_argument("--each", action="store_true", help="also run mrfm on every case alone and show its exit code")
    args = parser.parse_args(argv)
    out = args.outdir or Path(tempfile.mkdtemp(prefix="mrfm-hostile-"))
    corpus, store = out / "corpus", out / "results.zarr"

    cases = write_bad_inputs(corpus, seed=SEED)
    exit_code, stdout, events = run_mrfm(corpus, store)
    locations = label_locations(corpus)
    outcomes = defaultdict(list)
    unmatched = match_series(store, cases, locations, outcomes) + match_warnings(events, cases, locations, outcomes)

    alone = (
        {case: run_mrfm(path, out / "each" / f"{case}.zarr")[0] for case, path in cases.items()} if args.each else None
    )
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(outcome_table(cases, outcomes, exit_code, alone))
    dropped = sorted(set(cases) - set(outcomes))
    console.print(Text(f"mrfm run exit code: {exit_code}; {len(cases)} cases; corpus {corpus}; store {store}"))
    if unmatched:
        console.print(Text(f"not matched to a case: {'; '.join(unmatched)}"))
    console.print(
        Text(
            f"silently dropped: {', '.join(dropped) if dropped else 'none'} "
            "(every case must be a series in the store or a skipped file in the warnings)"
        )
    )
    leaks = identifiers_in_store(store)
    console.print(Text(f"patient identifiers in the store: {', '.join(leaks) if leaks else 'none'}"))
    if exit_code not in (0, 1):
        console.print(Text(stdout[-2000:]))
    return 1 if dropped else 0


def run_mrfm(corpus: Path, store: Path) -> tuple[int | str, str, list[dict]]:
    """One ``mrfm run`` over the whole corpus; returns (exit code, stdout, JSON-lines events)."""
    command = [
        sys.executable,
        "-m",
        "engine",
        "run",
        str(corpus),
        "--out",
        str(store),
        "--overwrite",
        "--heads",
        "classify",
        "--workers",
        "0",
        "--backend",
        "torch",
        "--log-json",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return f"hung (> {RUN_TIMEOUT_S} s)", _text(exc.stdout), parse_events(_text(exc.stderr))
    return done.returncode, done.stdout + done.stderr, parse_events(done.stderr)


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def parse_events(stderr: str) -> list[dict]:
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


# ---- matching -----------------------------------------------------------------------------------


def case_in(text: str, cases: dict[str, Path]) -> str | None:
    """The case whose ``bad_<case>`` name stands whole in ``text`` (a path, key or label)."""
    for case in sorted(cases, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9])bad_{re.escape(case)}(?![A-Za-z0-9_])", text):
            return case
    return None


def label_locations(corpus: Path) -> dict[str, str]:
    """Label -> path for every file of the corpus, from a scan in this process (the walk is sorted,
    so its labels are the run's)."""
    logging.getLogger("nibabel").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(getattr(engine.scan([corpus]), "locations", {}) or {})


def case_of_series(key: str, attrs: dict, cases: dict[str, Path], locations: dict[str, str]) -> str | None:
    """By description, else series UID, else the first source's path, else the key."""
    found = re.search(r"\bBAD ([A-Z0-9_]+)", attrs.get("description") or "")
    if found and found.group(1).lower() in cases:
        return found.group(1).lower()
    by_uid = {derive_uid(SEED, "bad", case): case for case in cases}
    first = str((attrs.get("source") or {}).get("first") or "")
    return (
        by_uid.get(attrs.get("series_uid") or "") or case_in(locations.get(first, first), cases) or case_in(key, cases)
    )


def match_series(
    store: Path, cases: dict[str, Path], locations: dict[str, str], outcomes: dict[str, list]
) -> list[str]:
    """Add each stored series to its case's outcomes; returns the keys matched to no case."""
    if not store.exists():
        return []
    unmatched = []
    for key, attrs in engine.open_store(store).iter_series():
        case = case_of_series(key, attrs, cases, locations)
        if case is None:
            unmatched.append(f"series {key}")
        else:
            outcomes[case].append((attrs.get("status", "?"), attrs.get("reason") or ""))
    return unmatched


def match_warnings(
    events: list[dict], cases: dict[str, Path], locations: dict[str, str], outcomes: dict[str, list]
) -> list[str]:
    """Add each file warning of the run to its case as a skipped file; returns the unmatched."""
    labels = sorted(locations, key=len, reverse=True)  # longest first: zip members before their zip
    unmatched = []
    for event in events:
        if event.get("event") != "warning":
            continue
        message = event.get("message", "")
        label = next((lb for lb in labels if message.startswith(lb + ":")), None)
        case = case_in(locations[label], cases) if label else case_in(message, cases)
        if case is None:
            unmatched.append(f"warning {message[:REASON_CHARS]}")
        else:
            reason = message[len(label) + 1 :].strip() if label else message
            outcomes[case].append(("skipped file", reason))
    return unmatched


# ---- report -------------------------------------------------------------------------------------


def outcome_table(
    cases: dict[str, Path], outcomes: dict[str, list], exit_code: int | str, alone: dict[str, int | str] | None = None
) -> Table:
    table = Table(title=f"mrfm over the hostile corpus (run exit code {exit_code})")
    for column in ("case", "expected", "outcome", *(["exit alone"] if alone else []), "reason"):
        table.add_column(column, overflow="fold")
    for case in cases:
        got = outcomes.get(case, [])
        statuses = " + ".join(f"{n}x {s}" if n > 1 else s for s, n in _counts(s for s, _ in got).items())
        reasons = "; ".join(dict.fromkeys(_short(r) for _, r in got if r))
        style = "green" if _agrees(EXPECTED.get(case, ""), got) else "yellow"
        # Text cells: descriptions and reasons come from the archive and may hold rich markup
        table.add_row(
            Text(case),
            Text(EXPECTED.get(case, "")),
            Text(statuses or "DROPPED", style=style if got else "red"),
            *([Text(str(alone.get(case, "")))] if alone else []),
            Text(reasons),
        )
    return table


def _counts(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _agrees(expected: str, got: list) -> bool:
    """Whether any outcome is one of the expected alternatives ('failed or skipped file')."""
    return bool({status for status, _ in got} & set(expected.split(" or ")))


def _short(reason: str) -> str:
    # the case column already says which file or series: drop the label or UID in front
    reason = re.sub(r"^(series \S+|[^\s:]+#[\d#]+): ", "", " ".join(reason.split()))
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."


def identifiers_in_store(store: Path) -> list[str]:
    """Which of the corpus' patient identifiers appear in the store's attributes or raw files
    (compressed chunks are not searched)."""
    if not store.exists():
        return []
    handle = engine.open_store(store)
    text = json.dumps([handle.runs(), list(handle.iter_series())], default=str).encode()
    blobs = [text] + [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    wanted = (PATIENT_NAME, PATIENT_NAME.replace("^", " "), PATIENT_ID, PATIENT_BIRTH_DATE)
    return [w for w in wanted if any(w.encode() in blob for blob in blobs)]


if __name__ == "__main__":
    sys.exit(main())
