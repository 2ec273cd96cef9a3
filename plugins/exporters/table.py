"""Tables: one Parquet and one CSV file per output kind (scores, values, boxes, embeddings).

Each series writes its rows to ``parts/<key>/<kind>.parquet`` (so a resumed export redoes only
changed series); ``finish`` concatenates the parts of every exported series. Rows are keyed by
study and series UID and carry the run id, head and head version, and the model fingerprint.

``finish`` also writes ``series.parquet``/``.csv``: one row per series group of the store, failed
and skipped ones too (description, orientation, shape, spacing, status, reason, run id, model
fingerprint, distribution flag), so every other table joins it on ``series_uid`` without losing
a row. A series whose source has no UIDs (NIfTI) has its series key as ``series_uid``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from engine import ExportContext

KINDS = ("scores", "values", "boxes", "embeddings")
_OUTPUT_KIND = {"scores": "scores", "value": "values", "boxes": "boxes", "embedding": "embeddings"}


class TableExporter:
    name = "table"
    description = "scores, values, boxes (world and voxel) and embeddings as Parquet and CSV, keyed by UIDs"
    version = "1"

    def export_series(self, ctx: ExportContext, key: str) -> list[Path]:
        import pyarrow as pa  # heavy: loaded when the table export runs, not when exporters register
        import pyarrow.parquet as pq  # heavy: loaded when the table export runs, not when exporters register

        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        attrs = ctx.attrs(key)
        model_fp = ctx.model(key).get("fingerprint")
        for head, output, meta in ctx.outputs(key, list(_OUTPUT_KIND)):
            record = (attrs.get("heads") or {}).get(head, {})
            # a source without UIDs (NIfTI) is keyed by its series key, so joins on series_uid stay one-to-one
            base = {
                "study_uid": attrs.get("study_uid") or "",
                "series_uid": attrs.get("series_uid") or key,
                "series_key": key,
                "run_id": record.get("run_id") or attrs.get("run_id"),
                "head": head,
                "head_version": meta.get("head_version") or record.get("version"),
                "output": output,
                "model_fingerprint": model_fp,
            }
            kind = _OUTPUT_KIND[meta["kind"]]
            rows[kind] += _rows(kind, ctx.read(key, head, output), meta, base)
        out = ctx.path("parts", key)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        files = []
        for kind, kind_rows in rows.items():
            if kind_rows:
                path = out / f"{kind}.parquet"
                pq.write_table(pa.Table.from_pylist(kind_rows), path)
                files.append(path)
        return files

    def finish(self, ctx: ExportContext, keys: list[str]) -> list[Path]:
        import pyarrow as pa  # heavy: loaded when the table export runs, not when exporters register
        import pyarrow.csv as pcsv  # heavy: loaded when the table export runs, not when exporters register
        import pyarrow.parquet as pq  # heavy: loaded when the table export runs, not when exporters register

        written = []
        for kind in KINDS:
            parts = [p for k in keys if (p := ctx.path("parts", k, f"{kind}.parquet")).exists()]
            parquet, csv = ctx.path(f"{kind}.parquet"), ctx.path(f"{kind}.csv")
            for old in (parquet, csv):
                old.unlink(missing_ok=True)
            if not parts:
                continue
            table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
            pq.write_table(table, parquet)
            if kind == "embeddings":  # CSV has no list type: one space-separated text column
                vec = [" ".join(f"{x:.7g}" for x in v) for v in table.column("embedding").to_pylist()]
                table = table.set_column(table.schema.get_field_index("embedding"), "embedding", pa.array(vec))
            pcsv.write_csv(table, csv)
            written += [parquet, csv]
        return written + _series_table(ctx)


SERIES_COLUMNS = (
    "series_uid",
    "study_uid",
    "series_key",
    "description",
    "modality",
    "orientation",
    "shape",
    "spacing",
    "status",
    "reason",
    "run_id",
    "model_fingerprint",
    "distribution_score",
    "distribution_threshold",
    "out_of_distribution",
)


def _series_table(ctx: ExportContext) -> list[Path]:
    """series.parquet and series.csv: every series group of the store (shape and spacing are
    lists in Parquet, 'x'-joined text in CSV)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = []
    for key, attrs in ctx.store.iter_series():
        geo = attrs.get("geometry") or {}
        dist = attrs.get("distribution") if isinstance(attrs.get("distribution"), dict) else {}
        ood = dist.get("out_of_distribution")
        rows.append(
            {
                "series_uid": attrs.get("series_uid") or key,
                "study_uid": attrs.get("study_uid") or "",
                "series_key": key,
                "description": attrs.get("description") or "",
                "modality": attrs.get("modality"),
                "orientation": geo.get("orientation"),
                "shape": [int(x) for x in geo.get("shape") or []] or None,
                "spacing": [float(x) for x in geo.get("spacing") or []] or None,
                "status": attrs.get("status"),
                "reason": attrs.get("reason"),
                "run_id": attrs.get("run_id"),
                "model_fingerprint": (ctx.model(key) or {}).get("fingerprint") if attrs.get("run_id") else None,
                "distribution_score": _float(dist.get("score")),
                "distribution_threshold": _float(dist.get("threshold")),
                "out_of_distribution": None if ood is None else bool(ood),
            }
        )
    schema = pa.schema(
        [
            (
                c,
                pa.list_(pa.int64())
                if c == "shape"
                else pa.list_(pa.float64())
                if c == "spacing"
                else pa.float64()
                if c.startswith("distribution_")
                else pa.bool_()
                if c == "out_of_distribution"
                else pa.string(),
            )
            for c in SERIES_COLUMNS
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, ctx.path("series.parquet"))
    for name in ("shape", "spacing"):
        text = ["x".join(f"{x:g}" for x in v) if v else None for v in table.column(name).to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(text, pa.string()))
    pcsv.write_csv(table, ctx.path("series.csv"))
    return [ctx.path("series.parquet"), ctx.path("series.csv")]


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _rows(kind: str, value: Any, meta: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    labels = list(meta.get("labels") or [])
    if kind == "scores":
        scores = np.asarray(value, dtype=np.float64).reshape(-1)
        return [
            {**base, "index": i, "label": labels[i] if i < len(labels) else str(i), "score": float(s)}
            for i, s in enumerate(scores)
        ]
    if kind == "values":
        values = np.asarray(value, dtype=np.float64).reshape(-1)
        return [
            {
                **base,
                "index": i,
                "label": labels[i] if i < len(labels) else None,
                "value": float(v),
                "units": meta.get("units"),
            }
            for i, v in enumerate(values)
        ]
    if kind == "embeddings":
        vec = np.asarray(value, dtype=np.float32).reshape(-1)
        return [
            {
                **base,
                "dim": int(vec.size),
                "normalized": bool(meta.get("normalized", False)),
                "embedding": [float(x) for x in vec],
            }
        ]
    world = np.asarray(value["world"], dtype=np.float64).reshape(-1, 6)
    voxel = np.asarray(value["voxel"], dtype=np.float64).reshape(-1, 6)
    scores = np.asarray(value["scores"], dtype=np.float64).reshape(-1)
    box_labels = value.get("labels")
    queries = value.get("queries")
    rows = []
    for n in range(len(scores)):
        row = {
            **base,
            "box": n,
            "label": str(box_labels[n]) if box_labels is not None else (labels[0] if len(labels) == 1 else None),
            "query": str(queries[n]) if queries is not None else None,
            "score": float(scores[n]),
        }
        row.update({f"{a}_mm": float(world[n, i]) for i, a in enumerate(("x0", "y0", "z0", "x1", "y1", "z1"))})
        row.update({a: float(voxel[n, i]) for i, a in enumerate(("i0", "j0", "k0", "i1", "j1", "k1"))})
        rows.append(row)
    return rows
