"""``mrfm show STORE [SERIES]...``: a series' outputs as a table in the terminal — scores with
their labels, values, box counts, mask label volumes in mL, the distribution flag; ``--json``
for the same data, ``--where KEY=VALUE`` to pick series. Python users call :func:`show_series`.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from .errors import UsageError
from .series_outputs import flag_text, series_outputs

# attributes --where can test; "distribution" matches in / out / none
WHERE_KEYS = (
    "status",
    "orientation",
    "modality",
    "reader",
    "study_uid",
    "series_uid",
    "series_key",
    "run_id",
    "distribution",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def _plain(value: Any) -> str:
    """Text from a store printed literally: control characters (escape sequences, carriage
    returns, bidi overrides) dropped, rich markup escaped, so data never drives the terminal."""
    from rich.markup import escape

    return escape(_CONTROL.sub("", "" if value is None else str(value)))


def parse_where(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``KEY=VALUE`` filters; an unknown key or a malformed item is a usage error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in WHERE_KEYS:
            raise UsageError(f"--where {item!r}: give KEY=VALUE with KEY one of {', '.join(WHERE_KEYS)}")
        out[key] = value.strip()
    return out


def _matches(key: str, attrs: dict[str, Any], where: dict[str, str]) -> bool:
    for name, want in where.items():
        if name == "distribution":
            dist = attrs.get("distribution") if isinstance(attrs.get("distribution"), dict) else None
            have = "none" if not dist else ("out" if dist.get("out_of_distribution") else "in")
        elif name == "series_key":
            have = key
        else:
            have = str(attrs.get(name) if name != "orientation" else (attrs.get("geometry") or {}).get("orientation"))
        if have != want:
            return False
    return True


def show_series(
    store: Any, series: list[str] | None = None, where: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The outputs of the series named (by key or SeriesInstanceUID; all when none is named)
    that pass ``where``, as :func:`engine.series_outputs.series_outputs` data. A name matching
    no series is a usage error."""
    from .store import ResultStore, open_store

    s = store if isinstance(store, ResultStore) else open_store(store, "r")
    where = where or {}
    picked: list[tuple[str, dict[str, Any]]] = []
    if series:
        wanted = list(dict.fromkeys(series))
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for name in wanted:  # a key is looked up directly; a UID needs the listing
            attrs = s.series_attrs(name)
            if attrs is not None:
                found[name] = (name, attrs)
        if len(found) < len(wanted):
            for key, attrs in s.iter_series():
                uid = attrs.get("series_uid")
                if uid in wanted and uid not in found:
                    found[uid] = (key, attrs)
        missing = [n for n in wanted if n not in found]
        if missing:
            raise UsageError(f"no series {', '.join(missing)} in {s.url} (give a series key or SeriesInstanceUID)")
        picked = [found[n] for n in wanted]
    else:
        picked = list(s.iter_series())
    return [series_outputs(s, key, attrs) for key, attrs in picked if _matches(key, attrs, where)]


def _fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def _table(data: dict[str, Any]) -> Any:
    from rich.table import Table

    status = _plain(data["status"])
    uid = _plain(data.get("series_uid") or data["series_key"])
    title = f"{_plain(data['description']) or '(no description)'}  [dim]{uid}[/]"
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in ("output", "kind", "result"):
        table.add_column(col, overflow="fold")
    geo = f"{_plain(data.get('orientation') or '?')} " + "x".join(str(s) for s in data.get("shape") or [])
    table.add_row(
        "series", "status", f"{status} · {geo}" + (f" · {_plain(data['reason'])}" if data.get("reason") else "")
    )
    dist = data.get("distribution")
    table.add_row(
        "model",
        "distribution",
        _plain(f"{flag_text(dist)} (score {dist.get('score')}, threshold {dist.get('threshold')})")
        if dist
        else "not recorded",
    )
    for s in data["scores"]:
        ranked = sorted(zip(s["labels"], s["scores"]), key=lambda p: -p[1])
        table.add_row(
            _plain(f"{s['head']}/{s['output']}"), "scores", ", ".join(f"{_plain(lab)} {_fmt(v)}" for lab, v in ranked)
        )
    for v in data["values"]:
        table.add_row(
            _plain(f"{v['head']}/{v['output']}"),
            "value",
            " ".join(_fmt(x) for x in v["values"]) + " " + _plain(v.get("units") or ""),
        )
    for b in data["boxes"]:
        best = b["top"][0] if b["top"] else None
        text = f"{b['count']} box(es)" + (f"; best {_plain(best['label'])} {_fmt(best['score'])}" if best else "")
        table.add_row(_plain(f"{b['head']}/{b['output']}"), "boxes", text)
    for m in data["masks"]:
        vols = ", ".join(
            f"{_plain(x['label'])} {x['ml']:.2f} mL"
            if x["ml"] is not None
            else f"{_plain(x['label'])} {x['voxels']} voxels"
            for x in m.get("labels") or []
            if x["voxels"]
        )
        table.add_row(_plain(f"{m['head']}/{m['output']}"), "mask", vols or "empty")
    for e in data["embeddings"]:
        table.add_row(_plain(f"{e['head']}/{e['output']}"), "embedding", f"{e['dim']} dimensions")
    for u in data["unreadable"]:
        table.add_row("", "[red]unreadable[/]", _plain(u))
    return table


@click.command("show")
@click.argument("store")
@click.argument("series", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="KEY=VALUE",
    help=f"Only series whose KEY is VALUE (repeatable; KEY: {', '.join(WHERE_KEYS)}; distribution: in, out or none).",
)
def show_command(store: str, series: tuple[str, ...], as_json: bool, where: tuple[str, ...]) -> None:
    """Show the outputs of SERIES (keys or SeriesInstanceUIDs; default: every series) in STORE."""
    from .cli import _open_existing, console
    from .store import open_store

    filters = parse_where(where)
    s = _open_existing(store, open_store)
    rows = show_series(s, list(series), filters)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        console.print("no series match", highlight=False)
        return
    for data in rows:
        console.print(_table(data), highlight=False)
    sys.stdout.flush()
