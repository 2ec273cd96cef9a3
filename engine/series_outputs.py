"""One series' results as plain data: scores with their labels, values, boxes, mask label
volumes in mL, the distribution flag. What ``mrfm show`` prints and the HTML report draws.

Only reads the store (:class:`engine.store.ResultStore`); an output that cannot be read is
reported under ``unreadable`` with its reason instead of failing the series.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import StoreError


def distribution_flag(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The series' ``distribution`` record {score, threshold, out_of_distribution}, or None when
    the store (an older one, or a model without training statistics) holds none."""
    dist = attrs.get("distribution")
    return dict(dist) if isinstance(dist, dict) else None


def flag_text(dist: dict[str, Any] | None) -> str:
    """'out of distribution' / 'in distribution' / '' (not recorded)."""
    if not dist or dist.get("out_of_distribution") is None:
        return ""
    return "out of distribution" if dist.get("out_of_distribution") else "in distribution"


def voxel_ml(attrs: dict[str, Any]) -> float | None:
    """The volume of one voxel of the series' native grid in mL (|det| of the affine / 1000)."""
    affine = (attrs.get("geometry") or {}).get("affine")
    try:
        return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    except (TypeError, ValueError, IndexError):
        return None


def label_volumes(mask: np.ndarray, labels: list[str], ml_per_voxel: float | None) -> list[dict[str, Any]]:
    """Voxels and mL of each foreground label of a label mask (label 0 is background)."""
    counts = np.bincount(np.asarray(mask).ravel().astype(np.int64), minlength=len(labels))
    out = []
    for value, n in enumerate(counts.tolist()):
        if value == 0 or (n == 0 and value >= len(labels)):
            continue
        out.append(
            {
                "label": labels[value] if value < len(labels) else str(value),
                "value": value,
                "voxels": int(n),
                "ml": round(n * ml_per_voxel, 3) if ml_per_voxel is not None else None,
            }
        )
    return out


def series_outputs(
    store: Any, key: str, attrs: dict[str, Any] | None = None, *, read_masks: bool = True
) -> dict[str, Any]:
    """Everything a reader looks at first on one series, as JSON-ready data.

    Keys: series_key, series_uid, study_uid, description, status, reason, orientation, shape,
    spacing, distribution, scores [{head, output, labels, scores}], values [{head, output,
    values, units}], boxes [{head, output, count, top [{label, score, world}]}], masks [{head,
    output, labels: [{label, value, voxels, ml}]}], embeddings [{head, output, dim}],
    unreadable [str].
    """
    attrs = store.series_attrs(key) if attrs is None else attrs
    attrs = attrs or {}
    geo = attrs.get("geometry") or {}
    out: dict[str, Any] = {
        "series_key": key,
        "series_uid": attrs.get("series_uid"),
        "study_uid": attrs.get("study_uid"),
        "description": attrs.get("description") or "",
        "status": attrs.get("status"),
        "reason": attrs.get("reason"),
        "orientation": geo.get("orientation"),
        "shape": geo.get("shape"),
        "spacing": geo.get("spacing"),
        "distribution": distribution_flag(attrs),
        "scores": [],
        "values": [],
        "boxes": [],
        "masks": [],
        "embeddings": [],
        "unreadable": [],
    }
    if attrs.get("status") != "complete":
        return out
    ml = voxel_ml(attrs)
    for head, record in sorted((attrs.get("heads") or {}).items()):
        if not isinstance(record, dict) or record.get("error"):
            continue
        for name in record.get("outputs") or []:
            try:
                _add_output(out, store, key, head, name, ml, read_masks)
            except (KeyError, StoreError, ValueError, TypeError) as exc:
                out["unreadable"].append(f"{head}/{name}: {type(exc).__name__}: {exc}")
    return out


def _add_output(
    out: dict[str, Any], store: Any, key: str, head: str, name: str, ml: float | None, read_masks: bool
) -> None:
    node = store.root["series"][key][head][name]
    meta = dict(node.attrs)
    kind = meta.get("kind")
    labels = [str(x) for x in meta.get("labels") or []]
    where = {"head": head, "output": name}
    if kind == "scores":
        scores = np.asarray(store.read_output(key, head, name), dtype=np.float64).reshape(-1)
        names = [labels[i] if i < len(labels) else str(i) for i in range(scores.size)]
        out["scores"].append({**where, "labels": names, "scores": [round(float(s), 6) for s in scores]})
    elif kind == "value":
        values = np.asarray(store.read_output(key, head, name), dtype=np.float64).reshape(-1)
        out["values"].append({**where, "values": [round(float(v), 6) for v in values], "units": meta.get("units")})
    elif kind == "boxes":
        v = store.read_output(key, head, name)
        scores = np.asarray(v["scores"], dtype=np.float64).reshape(-1)
        world = np.asarray(v["world"], dtype=np.float64).reshape(-1, 6)
        voxel = np.asarray(v["voxel"], dtype=np.float64).reshape(-1, 6)
        captions = box_captions(v, labels, scores.size)
        order = np.argsort(-scores, kind="stable")
        out["boxes"].append(
            {
                **where,
                "count": int(scores.size),
                "colors": meta.get("colors"),
                "top": [
                    {
                        "label": captions[i],
                        "score": round(float(scores[i]), 4),
                        "world": [round(float(x), 2) for x in world[i]],
                        "voxel": [float(x) for x in voxel[i]],
                    }
                    for i in order.tolist()
                ],
            }
        )
    elif kind == "mask":
        entry: dict[str, Any] = {**where, "labels_all": labels, "colors": meta.get("colors")}
        if read_masks:
            entry["labels"] = label_volumes(store.read_output(key, head, name), labels, ml)
        out["masks"].append(entry)
    elif kind == "embedding":
        out["embeddings"].append({**where, "dim": int(np.prod(node.shape))})


def box_captions(value: dict[str, Any], labels: list[str], n: int) -> list[str]:
    """Each box's name: its stored label, else its query, else the output's one label."""
    for column in ("labels", "queries"):
        if column in value:
            return [text_value(x) for x in np.asarray(value[column]).reshape(-1)][:n]
    return [labels[0] if len(labels) == 1 else "box"] * n


def text_value(x: Any) -> str:
    """A stored text cell as str, whether the array holds str, fixed-length bytes or UTF-32."""
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x).rstrip(b"\x00").decode("utf-8", errors="replace")
    return str(x)
