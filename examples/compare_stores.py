"""Whether two result stores hold the same results, byte for byte.

    python examples/compare_stores.py BEFORE.zarr AFTER.zarr

Every array chunk and data file must be equal to the byte; every ``zarr.json`` must be equal as
JSON once the values that differ from run to run by design are masked (run ids, times, seconds,
host, pid, heartbeats, archive roots and model folder paths). Prints each file that differs or
exists on one side only, then a count; exit status 0 when none differs, 1 otherwise. Used to show
that a change of code that should change no behaviour leaves every store as it was.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

VOLATILE = {
    "run_id",
    "started",
    "finished",
    "seconds",
    "timings",
    "host",
    "pid",
    "hostname",
    "heartbeat",
    "written",
    "created",
    "updated",
    "built",
    "time",
    "node",
    "paths",
    "path",
    "load",
    "infer",
    "write",
    "wait_for_load",
    "lock",
    "actor",
}
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


def mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {RUN_ID.sub("RUN", k): ("*" if k in VOLATILE else mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return RUN_ID.sub("RUN", value) if isinstance(value, str) else value


def files(root: Path) -> dict[str, Path]:
    return {RUN_ID.sub("RUN", str(p.relative_to(root))): p for p in root.rglob("*") if p.is_file()}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    a, b = Path(argv[0]), Path(argv[1])
    fa, fb = files(a), files(b)
    differ = 0
    for key in sorted(set(fa) | set(fb)):
        if key not in fa or key not in fb:
            print("only in", a if key in fa else b, key)
            differ += 1
            continue
        x, y = fa[key].read_bytes(), fb[key].read_bytes()
        if x == y or (key.endswith(".json") and mask(json.loads(x)) == mask(json.loads(y))):
            continue
        print("differs", key)
        differ += 1
    data = sum(1 for k in fa if not k.endswith(".json"))
    print(f"{a} vs {b}: {len(fa)} files ({data} chunk or data files) compared, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
