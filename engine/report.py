"""``mrfm report STORE --out DIR``: a static, offline HTML report of a result store.

``DIR/index.html`` (one file, inline CSS, no script, nothing fetched from anywhere) and
``DIR/img/*.png``: the runs, the series by status, the flagged (out-of-distribution) series, and
one row group per series (``data-series-uid``) with its description, orientation, shape and
status, the reason when it failed, and for a complete series slice montages with masks and
boxes overlaid (:mod:`.report_images`), scores as bars, values, boxes and the closest series by
retrieval embedding.

No patient identifier reaches the report: the store holds none (descriptions are scrubbed when
scanned), and source files are named by nothing. UIDs are shortened, in full on hover.

Images need the series' source image, read from the archive roots recorded in the store's runs
(or ``archive``); where it cannot be read the masks are drawn on black and the row says why.
A montage's file name carries a digest of what it shows, so a second report (or
``mrfm run --report``) redraws only series that changed.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import MrfmError, UsageError
from .series_outputs import distribution_flag, flag_text, series_outputs

IMG_DIR = "img"
MATCHES = 3  # closest series listed per series
BOXES_DRAWN = 5  # boxes drawn per output, best first
BOXES_LISTED = 8
STATUS_ORDER = ("failed", "damaged", "incomplete", "complete", "skipped")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def short_uid(uid: str, keep: int = 12) -> str:
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


@dataclass
class ReportSummary:
    """What :func:`write_report` wrote."""

    out: Path
    series: int
    images: int
    drawn: int  # images drawn now (the others were current already)
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Row:
    key: str
    attrs: dict[str, Any]
    html: str
    images: list[str]
    embedding: np.ndarray | None = None
    source: str | None = None  # "head/output" of the embedding


class ReportWriter:
    """Builds the report series by series: :meth:`series` (re)draws one series' row,
    :meth:`write` writes ``index.html`` from the rows drawn so far (atomically)."""

    def __init__(self, store: Any, out: str | Path, *, archive: Iterable[str | Path] | None = None):
        from .export import ExportContext
        from .store import ResultStore, open_store

        self.url = store.url if isinstance(store, ResultStore) else str(store)
        self.store = store if isinstance(store, ResultStore) else open_store(store, "r")
        self.out = Path(out)
        try:
            (self.out / IMG_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {self.out}: cannot create the report folder ({exc.strerror})") from exc
        self.ctx = ExportContext(self.store, self.out, "report", archive=archive)
        self.rows: dict[str, _Row] = {}
        self.drawn = 0
        self._lock = threading.Lock()

    # ---- series ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Draw every series of the store (rows already current cost a listing only)."""
        for key, attrs in self.store.iter_series():
            self.series(key, attrs)

    def series(self, key: str, attrs: dict[str, Any] | None = None) -> None:
        """(Re)draw one series' row from the store; a series that cannot be drawn gets a row
        saying why instead of images."""
        attrs = self.store.series_attrs(key) if attrs is None else attrs
        if attrs is None:
            return
        self.ctx._attrs.pop(key, None)
        stamp = _stamp(key, attrs)
        old = self.rows.get(key)
        if old is not None and _stamp(key, old.attrs) == stamp:
            return
        try:
            row = self._draw(key, attrs, stamp)
        except Exception as exc:  # one series that cannot be drawn never costs the report
            why = f"not drawn ({type(exc).__name__}: {exc})" if not isinstance(exc, MrfmError) else f"not drawn: {exc}"
            row = _Row(key, attrs, _row_html(key, attrs, None, [], note=why), [])
        with self._lock:
            self.rows[key] = row

    def _draw(self, key: str, attrs: dict[str, Any], stamp: str) -> _Row:
        if attrs.get("status") != "complete":
            return _Row(key, attrs, _row_html(key, attrs, None, []), [])
        data = series_outputs(self.store, key, attrs)
        images, note = self._montages(key, attrs, data, stamp)
        emb, source = None, None
        if data["embeddings"]:
            first = sorted(data["embeddings"], key=lambda e: (e["head"] != "retrieve", e["head"], e["output"]))[0]
            source = f"{first['head']}/{first['output']}"
            vec = np.asarray(self.store.read_output(key, first["head"], first["output"]), dtype=np.float32).reshape(-1)
            norm = float(np.linalg.norm(vec))
            emb = vec / norm if np.isfinite(norm) and norm > 0 else None
        return _Row(
            key, attrs, _row_html(key, attrs, data, images, note=note), [name for name, _ in images], emb, source
        )

    def _montages(
        self, key: str, attrs: dict[str, Any], data: dict[str, Any], stamp: str
    ) -> tuple[list[tuple[str, str]], str | None]:
        """(file name, caption) of each montage of a complete series, drawn unless current."""
        from .report_images import Box, hex_rgb, montage, save_png

        geo = attrs.get("geometry") or {}
        shape, affine = tuple(geo.get("shape") or ()), geo.get("affine")
        if len(shape) != 3 or affine is None:
            return [], "no geometry recorded: nothing to draw"
        masks = data["masks"] or [None]
        names = [f"{_safe(key)}-{stamp[:16]}-{i}.png" for i in range(len(masks))]
        captions = [f"{m['head']}/{m['output']}" if m else "image" for m in masks]
        if all((self.out / IMG_DIR / n).exists() for n in names):
            return list(zip(names, captions)), None
        note = None
        try:
            image = np.asarray(self.ctx.volume(key).data)
            if tuple(image.shape) != shape:
                note, image = (
                    f"source image has shape {list(image.shape)}, the store {list(shape)}: masks drawn on black",
                    None,
                )
        except Exception as exc:
            note, image = f"source image not read ({exc}): masks drawn on black", None
        boxes = []
        for b in data["boxes"]:
            color = hex_rgb((b.get("colors") or [None])[0], fallback=(255, 215, 0))
            for top in b["top"][:BOXES_DRAWN]:
                boxes.append(
                    Box(np.asarray(top["voxel"]), f"{top['label'][:24]} {top['score']:.2f}", color, top["score"])
                )
        boxes.sort(key=lambda b: -b.score)
        for name, m in zip(names, masks):
            overlay = []
            if m is not None:
                labels = m.get("labels_all") or []
                colors = [hex_rgb(c, fallback=_palette(i)) for i, c in enumerate(m.get("colors") or [])]
                colors += [_palette(i) for i in range(len(colors), max(len(labels), 2))]
                overlay.append((np.asarray(self.store.read_output(key, m["head"], m["output"])), colors))
            img = montage(image, np.asarray(affine, dtype=np.float64), shape, overlay, boxes)
            tmp = self.out / IMG_DIR / f".{name}.{os.getpid()}.tmp"
            save_png(img, tmp)
            os.replace(tmp, self.out / IMG_DIR / name)
            self.drawn += 1
        return list(zip(names, captions)), note

    # ---- page -------------------------------------------------------------------------------
    def write(self) -> Path:
        """Write index.html from the rows drawn so far; unreferenced old montages are removed."""
        with self._lock:
            rows = sorted(
                self.rows.values(),
                key=lambda r: (
                    STATUS_ORDER.index(_status(r.attrs)) if _status(r.attrs) in STATUS_ORDER else 9,
                    str(r.attrs.get("study_uid") or ""),
                    str(r.attrs.get("description") or ""),
                    r.key,
                ),
            )
            matches = _matches(rows)
            page = _page(self.store, rows, matches)
        tmp = self.out / f".index.html.{os.getpid()}.tmp"
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, self.out / "index.html")
        keep = {n for r in rows for n in r.images}
        for f in (self.out / IMG_DIR).glob("*.png"):
            if f.name not in keep:
                f.unlink(missing_ok=True)
        return self.out / "index.html"


class LiveReport:
    """``mrfm run --report DIR``: redraws a series' row as its event arrives and rewrites the
    page at most every ``every`` seconds, and once at the end (:meth:`close`). Opens the store
    for reading on the first event (the run creates it)."""

    def __init__(self, store_url: str, out: str | Path, every: float = 5.0):
        self.url, self.out, self.every = store_url, Path(out), every
        self.writer: ReportWriter | None = None
        self.last = 0.0
        self.errors: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") != "series":
            return
        try:
            if self.writer is None:
                self.writer = ReportWriter(self.url, self.out)
                self.writer.refresh()
            else:
                self.writer.series(str(event.get("key")))
            if time.monotonic() - self.last >= self.every:
                self.writer.write()
                self.last = time.monotonic()
        except Exception as exc:  # the report must never cost the run
            self.errors.append(f"report: {type(exc).__name__}: {exc}")

    def close(self) -> Path | None:
        try:
            if self.writer is None:
                self.writer = ReportWriter(self.url, self.out)
            self.writer.refresh()
            return self.writer.write()
        except Exception as exc:
            self.errors.append(f"report: {type(exc).__name__}: {exc}")
            return None


def write_report(store: Any, out: str | Path, *, archive: Iterable[str | Path] | None = None) -> ReportSummary:
    """Write the HTML report of ``store`` (a path, a URL such as s3://bucket/store, or an open
    ResultStore) into the folder ``out``; returns what was written."""
    t = time.perf_counter()
    writer = ReportWriter(store, out, archive=archive)
    writer.refresh()
    writer.write()
    counts: dict[str, int] = {}
    for r in writer.rows.values():
        counts[_status(r.attrs)] = counts.get(_status(r.attrs), 0) + 1
    return ReportSummary(
        writer.out,
        len(writer.rows),
        sum(len(r.images) for r in writer.rows.values()),
        writer.drawn,
        time.perf_counter() - t,
        counts,
    )


# ---- helpers --------------------------------------------------------------------------------
def _status(attrs: dict[str, Any]) -> str:
    return str(attrs.get("status") or "unknown")


def _safe(key: str) -> str:
    return _UNSAFE.sub("_", key)[:80]


def _stamp(key: str, attrs: dict[str, Any]) -> str:
    """A digest of what a series' row shows: its key, status, write time and head records."""
    basis = {
        k: attrs.get(k)
        for k in ("status", "reason", "written", "fingerprint", "heads", "geometry", "distribution", "description")
    }
    return hashlib.sha256(json.dumps([key, basis], sort_keys=True, default=str).encode()).hexdigest()


def _palette(i: int) -> tuple[int, int, int]:
    colors = [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
    ]
    return colors[i % len(colors)] if i < len(colors) else colors[1 + i % (len(colors) - 1)]


def _matches(rows: list[_Row]) -> dict[str, list[tuple[_Row, float]]]:
    """Each complete series' closest other series by cosine of their embeddings (same source)."""
    out: dict[str, list[tuple[_Row, float]]] = {}
    by_source: dict[tuple[str, int], list[_Row]] = {}
    for r in rows:
        if r.embedding is not None and r.source:
            by_source.setdefault((r.source, r.embedding.size), []).append(r)
    for group in by_source.values():
        if len(group) < 2:
            continue
        matrix = np.stack([r.embedding for r in group])
        sims = matrix @ matrix.T
        np.fill_diagonal(sims, -np.inf)
        for i, r in enumerate(group):
            top = np.argsort(-sims[i], kind="stable")[:MATCHES]
            out[r.key] = [(group[j], float(sims[i, j])) for j in top if np.isfinite(sims[i, j])]
    return out


def _uid(uid: Any, label: str) -> str:
    text = str(uid or "")
    return f'<span class="uid" title="{esc(label)} {esc(text)}">{esc(short_uid(text))}</span>' if text else "—"


def _row_html(
    key: str, attrs: dict[str, Any], data: dict[str, Any] | None, images: list[tuple[str, str]], note: str | None = None
) -> str:
    geo = attrs.get("geometry") or {}
    status = _status(attrs)
    dist = distribution_flag(attrs)
    flag = flag_text(dist)
    flag_html = (
        f'<span class="flag ood" title="score {esc(dist.get("score"))}, threshold {esc(dist.get("threshold"))}">{esc(flag)}</span>'
        if dist and dist.get("out_of_distribution")
        else (f'<span class="flag">{esc(flag)}</span>' if flag else "—")
    )
    shape = "×".join(str(s) for s in geo.get("shape") or []) or "—"
    spacing = " × ".join(f"{float(s):.3g}" for s in geo.get("spacing") or [])
    uid = str(attrs.get("series_uid") or key)
    cells = [
        f'<td><a href="#s-{esc(_safe(key))}">{esc(attrs.get("description") or "(no description)")}</a>'
        f'<div class="sub">series {_uid(attrs.get("series_uid"), "SeriesInstanceUID")} · study {_uid(attrs.get("study_uid"), "StudyInstanceUID")}</div></td>',
        f"<td>{esc(geo.get('orientation') or '—')}</td>",
        f'<td>{esc(shape)}<div class="sub">{esc(spacing + " mm" if spacing else "")}</div></td>',
        f'<td><span class="status {esc(status)}">{esc(status)}</span></td>',
        f"<td>{flag_html}</td>",
        f'<td class="reason">{esc(attrs.get("reason") or "")}</td>',
    ]
    head = f'<tr class="row" id="s-{esc(_safe(key))}">' + "".join(cells) + "</tr>"
    body = ""
    if data is not None or note:
        body = f'<tr class="detail"><td colspan="6">{_detail_html(data, images, note)}</td></tr>'
    return (
        f'<tbody class="series" data-series-uid="{esc(uid)}" data-series-key="{esc(key)}" data-status="{esc(status)}">'
        f"{head}{body}<!--matches:{esc(key)}--></tbody>"
    )


def _detail_html(data: dict[str, Any] | None, images: list[tuple[str, str]], note: str | None) -> str:
    parts = []
    if note:
        parts.append(f'<p class="note">{esc(note)}</p>')
    for name, caption in images:
        parts.append(
            f'<figure><img src="{IMG_DIR}/{esc(name)}" alt="{esc(caption)} montage" loading="lazy">'
            f"<figcaption>{esc(caption)} · axial, coronal, sagittal (patient's right on the left)</figcaption></figure>"
        )
    if data is None:
        return "".join(parts)
    cols = []
    for s in data["scores"]:
        bars = "".join(
            f'<div class="bar"><span class="lab">{esc(lab)}</span><span class="track"><span class="fill" style="width:{_pct(v)}%"></span></span>'
            f'<span class="num">{v:.3f}</span></div>'
            for lab, v in zip(s["labels"], s["scores"])
        )
        cols.append(f'<div class="card"><h4>{esc(s["head"])}/{esc(s["output"])}</h4>{bars}</div>')
    for v in data["values"]:
        vals = ", ".join(f"{x:.4g}" for x in v["values"])
        cols.append(
            f'<div class="card"><h4>{esc(v["head"])}/{esc(v["output"])}</h4><p class="value">{esc(vals)} {esc(v.get("units") or "")}</p></div>'
        )
    for m in data["masks"]:
        rows = "".join(
            f"<tr><td>{esc(x['label'])}</td><td>{x['voxels']}</td><td>{_ml(x['ml'])}</td></tr>"
            for x in m.get("labels") or []
        )
        cols.append(
            f'<div class="card"><h4>{esc(m["head"])}/{esc(m["output"])}</h4><table class="mini"><tr><th>label</th><th>voxels</th><th>mL</th></tr>{rows}</table></div>'
        )
    for b in data["boxes"]:
        rows = "".join(
            f"<tr><td>{esc(t['label'])}</td><td>{t['score']:.3f}</td><td>{esc(', '.join(f'{x:.1f}' for x in t['world']))}</td></tr>"
            for t in b["top"][:BOXES_LISTED]
        )
        more = f'<p class="sub">{b["count"] - BOXES_LISTED} more</p>' if b["count"] > BOXES_LISTED else ""
        cols.append(
            f'<div class="card"><h4>{esc(b["head"])}/{esc(b["output"])} · {b["count"]} box(es)</h4>'
            f'<table class="mini"><tr><th>label</th><th>score</th><th>world mm (RAS)</th></tr>{rows}</table>{more}</div>'
        )
    for u in data["unreadable"]:
        parts.append(f'<p class="note">unreadable: {esc(u)}</p>')
    return "".join(parts) + f'<div class="cards">{"".join(cols)}</div>'


def _ml(ml: float | None) -> str:
    return "" if ml is None else f"{ml:.2f}"


def _pct(v: float) -> str:
    return f"{max(0.0, min(1.0, float(v))) * 100:.1f}" if np.isfinite(v) else "0"


def _matches_html(found: list[tuple[_Row, float]]) -> str:
    items = "".join(
        f'<li><a href="#s-{esc(_safe(r.key))}">{esc(r.attrs.get("description") or r.key)}</a> <span class="num">{s:.3f}</span></li>'
        for r, s in found
    )
    return f'<tr class="detail"><td colspan="6"><div class="card matches"><h4>closest series (retrieval)</h4><ol>{items}</ol></div></td></tr>'


def _page(store: Any, rows: list[_Row], matches: dict[str, list[tuple[_Row, float]]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[_status(r.attrs)] = counts.get(_status(r.attrs), 0) + 1
    runs = store.runs()
    run_rows = "".join(
        f'<tr><td>{esc(rid)}</td><td><span class="status {esc(a.get("status"))}">{esc(a.get("status"))}</span></td>'
        f"<td>{esc(a.get('started') or '')}</td><td>{esc((a.get('backend') or {}).get('name') or '')}</td>"
        f"<td>{esc(', '.join(a.get('heads') or {}))}</td>"
        f"<td>{esc(' '.join(f'{k} {v}' for k, v in (a.get('counts') or {}).items() if v))}</td></tr>"
        for rid, a in runs.items()
    )
    flagged = [r for r in rows if (distribution_flag(r.attrs) or {}).get("out_of_distribution")]
    recorded = sum(1 for r in rows if distribution_flag(r.attrs))
    if flagged:
        flag_html = (
            "<ul>"
            + "".join(
                f'<li><a href="#s-{esc(_safe(r.key))}">{esc(r.attrs.get("description") or r.key)}</a></li>'
                for r in flagged
            )
            + "</ul>"
        )
    else:
        flag_html = "<p>none</p>" if recorded else "<p>no series in this store records a distribution check</p>"
    model = dict(store.root.attrs).get("model") or {}
    body = []
    for r in rows:
        text = r.html
        found = matches.get(r.key)
        text = text.replace(f"<!--matches:{esc(r.key)}-->", _matches_html(found) if found else "")
        body.append(text)
    summary = (
        ", ".join(f'<span class="status {esc(k)}">{esc(k)}</span> {v}' for k, v in sorted(counts.items())) or "none"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mrfm report</title><style>{_CSS}</style></head><body>
<h1>mrfm report</h1>
<p class="sub">model {esc(model.get("name") or "")} <span class="uid" title="{esc(model.get("fingerprint") or "")}">{esc(str(model.get("fingerprint") or "")[:23])}</span> · {len(rows)} series</p>
<section><h2>Series by status</h2><p id="counts">{summary}</p></section>
<section><h2>Flagged series (out of distribution)</h2><div id="flagged">{flag_html}</div></section>
<section><h2>Runs</h2><table class="runs"><tr><th>run</th><th>status</th><th>started</th><th>backend</th><th>heads</th><th>series</th></tr>{run_rows}</table></section>
<section><h2>Series</h2><table class="series-table"><thead><tr><th>description</th><th>orientation</th><th>shape / spacing</th><th>status</th><th>distribution</th><th>reason</th></tr></thead>
{"".join(body)}</table></section>
</body></html>
"""


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{margin:0 0 .2em}h2{font-size:1.1em;margin:1.2em 0 .4em}h4{margin:0 0 .3em;font-size:.95em}
table{border-collapse:collapse}th,td{padding:3px 8px;text-align:left;vertical-align:top}
.series-table>thead th,.runs th{background:#eee}.series-table tbody.series{border-top:1px solid #ccc}
.sub{color:#666;font-size:.85em}.uid{border-bottom:1px dotted #888;cursor:help}
.status{padding:0 5px;border-radius:3px;background:#ddd}.status.complete{background:#c8efc8}.status.failed,.status.damaged{background:#f6c6c6}
.status.skipped{background:#f3e6b3}.status.incomplete{background:#e6d0f3}.flag.ood{background:#ffd27f;padding:0 5px;border-radius:3px}
.reason{color:#a00;max-width:40em}.note{color:#8a5a00}
figure{display:inline-block;margin:4px 10px 4px 0}figcaption{font-size:.8em;color:#555}img{display:block;background:#000}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px 8px;min-width:14em}
.bar{display:flex;align-items:center;gap:6px;font-size:.85em}.bar .lab{width:7em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.track{display:inline-block;width:120px;height:9px;background:#eee}.fill{display:block;height:9px;background:#4a7fd6}
.num{font-variant-numeric:tabular-nums;color:#333}.mini td,.mini th{padding:1px 6px;font-size:.85em}.value{font-size:1.1em;margin:0}
"""
