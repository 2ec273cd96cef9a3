"""Print the head-contract table: for each view kind and input orientation, how much of the native
grid an all-foreground head covers, the Dice of a threshold head mapped back against the same
threshold on the native grid, and whether a half-field head (world x > 0) lands on the right side.

The measurements are the ones tests/test_head_contract.py asserts; this script only tabulates them.

    .venv/bin/python examples/head_contract_table.py
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_head_contract.py"


def _contract_module():
    spec = importlib.util.spec_from_file_location("head_contract", TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> int:
    contract = _contract_module()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in contract.VIEW_KINDS:
            for name in contract.ORIENTATIONS:
                m = contract.measure(name, kind, tmp)
                rows.append((kind, name, m["coverage"], m["dice"], m["half_correct"]))
    print("| view   | orientation | all-foreground coverage | threshold Dice | half-field correct |")
    print("|--------|-------------|-------------------------|----------------|--------------------|")
    for kind, name, coverage, dice, half in rows:
        print(f"| {kind:<6} | {name:<11} | {coverage:>22.3f}% | {dice:>14.3f} | {'yes' if half else 'NO':<18} |")
    bad = [r for r in rows if r[2] < 100.0 or r[3] < contract.MIN_DICE or not r[4]]
    print(f"\nminimum Dice {min(r[3] for r in rows):.3f} (required {contract.MIN_DICE}); {len(bad)} row(s) failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
