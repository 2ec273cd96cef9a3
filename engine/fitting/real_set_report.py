"""How ``mrfm evaluate`` shows a real evaluation set (a folder holding ``real_set.json``): one row
per series, then each figure beside its target. Kept apart from the synthetic table so that the
two are never mixed up: the real set has no voxel ground truth, only protocol labels and an
independent head mask."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

FIGURES = (
    ("region_accuracy", "region accuracy"),
    ("confident_wrong_unflagged", "wrong with p >= 0.8 and not flagged"),
    ("median_head_dice", "non-background vs independent head mask, median Dice"),
    ("healthy_lesion_le_1pct", "healthy series with lesion <= 1 % of the head"),
    ("median_lesion_fraction", "median lesion fraction of the head (healthy)"),
    ("flag_rate", "flagged out of distribution"),
)


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def to_markdown(result: dict[str, Any]) -> str:
    f = result["figures"]
    lines = ["| real set (protocol labels, independent head mask) | value | target |", "|---|---|---|"]
    lines += [f"| {label} | {_fmt(f.get(key))} | {f['targets'].get(key, '')} |" for key, label in FIGURES]
    return "\n".join(lines) + "\n"


def print_real_set(
    result: dict[str, Any], console: Console, json_path: str | None = None, md_path: str | None = None
) -> None:
    per = Table(title=f"real set: {result['figures']['series']} series ({result['figures']['complete']} complete)")
    for col in ("series", "region", "p", "head Dice", "lesion / head", "flagged"):
        per.add_column(col)
    for r in result["series"]:
        per.add_row(
            r["source"],
            r.get("region", r["status"]),
            _fmt(r.get("region_p")),
            _fmt(r.get("head_dice")),
            _fmt(r.get("lesion_fraction")),
            _fmt(r.get("flagged")),
        )
    console.print(per)
    fig = Table(title="real set figures")
    for col in ("figure", "value", "target"):
        fig.add_column(col)
    for key, label in FIGURES:
        fig.add_row(label, _fmt(result["figures"].get(key)), result["figures"]["targets"].get(key, ""))
    console.print(fig)
    if result.get("missing"):
        console.print(f"sources missing on this machine: {', '.join(result['missing'])}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if md_path:
        Path(md_path).write_text(to_markdown(result))
