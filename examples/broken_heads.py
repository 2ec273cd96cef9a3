"""What a run does with a broken third-party head: one row per way a head can break.

    python examples/broken_heads.py [OUTDIR]

Each case is a real installed distribution (a ``*.dist-info`` with an ``mrfm`` entry point in a
site folder put on PYTHONPATH), so mrfm finds it exactly as it finds a pip-installed head. Each
case runs ``mrfm run ARCHIVE --heads classify,broken`` (a small demo archive: 2 studies, 5
series) in its own process and reads the store back: the run's exit code, the series' statuses,
whether classify's outputs were written, and what the store records for the broken head.
Exit status 0 when every case kept classify's outputs and named the broken head's reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MANIFEST = {
    "name": "broken",
    "version": "1.0.0",
    "description": "a deliberately broken head",
    "encoder": {"fingerprint": "any"},
    "inputs": {"view": "global", "features": ["cls"]},
    "outputs": [{"name": "v", "kind": "value", "dtype": "float32", "shape": [], "units": "1"}],
}

# case -> (body of predict(self, batch), manifest changes, module prefix); "import error" never defines a head
CASES: dict[str, tuple[str, dict, str]] = {
    "raises": ("raise RuntimeError('weights went missing')", {}, ""),
    "wrong shape": ("return [{'v': np.ones(3)} for _ in batch]", {}, ""),
    "NaN": ("return [{'v': float('nan')} for _ in batch]", {}, ""),
    "undeclared output": ("return [{'v': 1.0, 'extra': 2.0} for _ in batch]", {}, ""),
    "missing output": ("return [{} for _ in batch]", {}, ""),
    "empty batch": ("return []", {}, ""),
    "over budget": ("time.sleep(3); return [{'v': 1.0} for _ in batch]", {"budget_seconds": 0.5}, ""),
    "invalid manifest": ("return [{'v': 1.0} for _ in batch]", {"outputs": [{"name": "v", "kind": "histogram"}]}, ""),
    "import error": ("return [{'v': 1.0} for _ in batch]", {}, "import mrfm_missing_dependency\n"),
}

MODULE = """\
{prefix}import time
from pathlib import Path

import numpy as np

import engine


class Broken(engine.Head):
    manifest_path = Path(__file__).with_name("manifest.json")

    def predict(self, batch):
        {body}


@engine.hookimpl
def register_heads(register):
    register(Broken)
"""


def install_case(site: Path, case: str) -> None:
    """Write the case as an installed distribution ``mrfm-head-broken`` into ``site``."""
    body, changes, prefix = CASES[case]
    pkg = site / "mrfm_head_broken"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(MODULE.format(prefix=prefix, body=body))
    (pkg / "manifest.json").write_text(json.dumps({**MANIFEST, **changes}, indent=2))
    dist = site / "mrfm_head_broken-1.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mrfm-head-broken\nVersion: 1.0.0\n")
    (dist / "entry_points.txt").write_text("[mrfm]\nbroken = mrfm_head_broken\n")


def store_says(store: Path) -> dict:
    """Series statuses, how many kept classify's outputs, and what the store records for the broken head."""
    import zarr

    root = zarr.open_group(str(store), mode="r")
    statuses, classify_ok, said = [], 0, set()
    for _, group in root["series"].groups():
        attrs = dict(group.attrs)
        statuses.append(attrs.get("status"))
        classify_ok += "classify" in group and {"region", "contrast"} <= set(group["classify"].array_keys())
        error = (attrs.get("heads", {}).get("broken") or {}).get("error")
        if error:
            said.add(error.split(" on a batch")[0][:100])
    return {"statuses": statuses, "classify": classify_ok, "said": sorted(said)}


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mrfm-broken-"))
    archive = out / "archive"
    if not (archive / "dicom").exists():
        subprocess.run(
            [sys.executable, "-m", "engine", "demo-archive", str(archive), "--studies", "2", "--seed", "3"],
            check=True,
            capture_output=True,
        )
    rows, ok = [], True
    for case in CASES:
        slug = case.replace(" ", "_")
        site, store = out / "site" / slug, out / f"{slug}.zarr"
        if not site.exists():
            install_case(site, case)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
        env.pop("MRFM_LOAD_PLUGINS", None)
        env["COLUMNS"] = "400"  # one line per message
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine",
                "run",
                str(archive / "dicom"),
                "--out",
                str(store),
                "--log-json",
                "--heads",
                "classify,broken",
                "--overwrite",
                "--workers",
                "0",
                "--backend",
                "torch",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        said = store_says(store) if (store / "zarr.json").exists() else None
        told = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "warning:"))]
        if said:
            statuses = ", ".join(f"{s} {said['statuses'].count(s)}" for s in sorted(set(said["statuses"])))
            store_text = f"{statuses}; classify written for {said['classify']}/{len(said['statuses'])}; " + (
                " | ".join(said["said"]) or "-"
            )
            ok &= said["classify"] == len(said["statuses"]) and bool(said["said"])
        else:
            store_text = "no store written"
            ok &= proc.returncode == 2  # refused before starting: a usage error naming the head
        rows.append((case, proc.returncode, store_text, " ".join(told)[:160]))
    print(
        "| case | exit | store (series statuses; classify kept; the broken head's recorded error) | the CLI said (stderr error/warning lines) |\n|---|---|---|---|"
    )
    for case, code, store_text, message in rows:
        print(f"| {case} | {code} | {store_text} | {message} |")
    print(
        f"\narchive: 2 studies, 5 series; every case {'kept' if ok else 'did NOT keep'} classify's outputs and recorded why"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
