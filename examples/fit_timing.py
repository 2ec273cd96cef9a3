"""How long `mrfm fit` takes on this machine, and whether each fit beats its random-encoder floor.

    python examples/fit_timing.py [OUTDIR] [--studies 24] [--kinds classify,segment] [--steps N]

Writes a labelled synthetic archive (``mrfm demo-archive``, seed 11), then fits each kind twice
through :func:`engine.fitting.fit` with one feature cache: the first call encodes every labelled
series through the frozen encoder (and through a random encoder of the same architecture, for the
floor); the second finds every feature in the cache and skips the floor, so its time is the
refit a user pays when changing labels or settings. Prints, per kind and call: views encoded, seconds for features and
for fitting, the validation metrics beside the random-encoder floor. Head packages are written to
``OUTDIR/<kind>-head`` (``pip install`` them, then ``mrfm run --heads <name>``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

# classify: region only (the contrast probe is in the shipped head's table); segment: every label
TARGETS = {"classify": ["region"], "regress": ["lesion_volume"]}


def _metric_pairs(metrics: dict, floor: dict | None, prefix: str = ""):
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _metric_pairs(value, (floor or {}).get(key) if floor else None, f"{prefix}{key}.")
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and key not in ("threshold", "max_boxes", "lesions", "queries")
        ):
            yield f"{prefix}{key}", value, (floor or {}).get(key) if floor else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--kinds", default="classify,segment")
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps per fit (0: each kind's default)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mrfm-fit-"))
    torch.set_num_threads(2)

    from engine.fitting import fit
    from engine.synthetic import write_demo_archive

    archive = out / "train"
    if not (archive / "dicom").exists():
        manifest = write_demo_archive(archive, studies=args.studies, seed=11)
        print(f"archive: {len(manifest.studies)} studies, {len(manifest.series)} series")
    rows = []
    for kind in [k for k in args.kinds.split(",") if k]:
        for call in ("first (encodes)", "refit (cached)"):
            t0 = time.perf_counter()
            # the floor is measured once, on the first call; a refit is what changing labels or settings costs
            result = fit(
                kind,
                archive,
                out / f"{kind}-head",
                name=f"my-{kind}",
                targets=TARGETS.get(kind),
                cache_dir=out / "features",
                floor=call.startswith("first"),
                steps=args.steps,
            )
            wall = time.perf_counter() - t0
            rows.append((kind, call, result.encoded, result.seconds, wall, result.metrics, result.floor))
    print("| kind | call | views encoded | wall s | seconds by stage |\n|---|---|---|---|---|")
    for kind, call, encoded, seconds, wall, _, _ in rows:
        print(
            f"| {kind} | {call} | {encoded} | {wall:.1f} | {json.dumps({k: round(v, 1) for k, v in seconds.items()})} |"
        )
    print("\n| kind | metric (validation studies) | fitted | random-encoder floor |\n|---|---|---|---|")
    for kind, call, _, _, _, metrics, floor in rows:
        if call.startswith("first"):
            for name, value, fl in _metric_pairs(metrics, floor):
                print(f"| {kind} | {name} | {value:.3f} | {'—' if fl is None else f'{fl:.3f}'} |")
    print(f"\npackages: {', '.join(str(out / f'{k}-head') for k in args.kinds.split(',') if k)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
