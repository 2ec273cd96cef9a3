"""``evaluate``: run heads over a labelled synthetic archive through the real pipeline and score
what ``mrfm run`` stored against the archive's ground truth, each metric beside its floor.

Heads are scored by what they declare, so fitted packages and the contrib heads alike:
scores over region or contrast labels -> accuracy and AUROC; a value -> MAE against the visible
lesion volume (mL); a mask whose labels name ground-truth labels -> Dice per label; boxes with
labels -> lesion detection (recall at IoU >= 0.3 and 0.5, false boxes per series, FROC points,
AP@0.3, mean best IoU, lesion-free series with no box; see :mod:`.detection_metrics`), beside the
old, gameable "centre-in-box rate" (a lesion's centre inside any box, which a box the size of the
volume always wins) and "centre box precision"; boxes with queries -> grounding hit rate at IoU
>= 0.3 and 0.5 and the pointing game (the box centre inside the lesion), beside the gameable
centre-in-box rate; a normalised embedding ->
report->scan and scan->report recall@1/5/10 with the model's text tower.

Floors are chance, computed exactly from the ground truth (documented in ``FLOORS``); ``fit``
records the measured random-encoder floor of each fitted head in its manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..vocabulary import CONTRASTS, REGIONS
from . import metrics as M
from .detection_metrics import FROC_RATES, IOU_LEVELS, DetectionCounter, GroundingCounter, inside_ellipsoid
from .labels import lesion_box, lesion_phrase, visible_lesions

FLOORS = {
    "accuracy": "always the most frequent class",
    "auroc": "0.5 (random scores)",
    "mae": "always the median of the truth",
    "dice": "random labels at the true label frequencies (= the label's voxel fraction)",
    "hit_rate": "the predicted boxes placed at random in the field of view (their volume fraction)",
    "recall": "random ranking: 1 - C(n - m, k) / C(n, k) for m relevant of n",
}


def _row(head: str, kind: str, metric: str, value: Any, floor: Any, n: int, note: str = "") -> dict[str, Any]:
    return {
        "head": head,
        "kind": kind,
        "metric": metric,
        "value": M.r4(value),
        "floor": M.r4(floor),
        "n": n,
        "note": note,
    }


def score_store(
    store_path: str | Path,
    manifest: Any,
    manifests: dict[str, dict[str, Any]],
    model: Any = None,
    tables: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Metric rows for every head in ``manifests`` (name -> head manifest) found in the store;
    ``tables``, when given, receives each classification output's reliability table."""
    from engine.store import open_store  # fitting reaches the run path only when it runs, never at import

    store = open_store(store_path)
    label_ids = {v: k for k, v in manifest.label_names.items()}
    acc: dict[str, dict[str, Any]] = {}
    series = [(k, a) for k, a in store.iter_series() if a.get("status") == "complete"]
    flags = [(attrs.get("distribution") or {}).get("out_of_distribution") for _, attrs in series]
    for key, attrs in series:
        truth = manifest.series_by_uid(attrs["series_uid"])
        shape = tuple(attrs["geometry"]["shape"])
        affine = np.asarray(attrs["geometry"]["affine"], dtype=np.float64)
        lesions = visible_lesions(manifest, truth)
        fov = float(np.prod(np.asarray(shape) * np.linalg.norm(affine[:3, :3], axis=0)))
        for head, spec in manifests.items():
            if head not in attrs.get("heads", {}) or attrs["heads"][head].get("error"):
                continue
            for out in spec["outputs"]:
                try:
                    value = store.read_output(key, head, out["name"])
                except Exception:
                    continue
                a = acc.setdefault(f"{head}/{out['name']}", {"head": head, "out": out})
                kind, labels = out["kind"], out.get("labels", [])
                if kind == "scores":
                    target = (
                        REGIONS if set(labels) <= set(REGIONS) else CONTRASTS if set(labels) <= set(CONTRASTS) else None
                    )
                    if target is None:
                        continue
                    t = truth.region if target is REGIONS else truth.contrast
                    if t in labels:
                        a.setdefault("probs", []).append(np.asarray(value, float))
                        a.setdefault("truth", []).append(labels.index(t))
                        a["what"] = "region" if target is REGIONS else "contrast"
                elif kind == "value":
                    a.setdefault("pred", []).append(float(np.asarray(value)))
                    a.setdefault("truth", []).append(float(sum(les.volume_ml for les in lesions)))
                elif kind == "mask":
                    if not set(labels[1:]) & set(label_ids):
                        continue
                    from .trainers import (
                        labels_on_grid,
                    )  # fitting reaches the run path only when it runs, never at import

                    gt = labels_on_grid(manifest.root / truth.label_map, affine, shape)
                    pred = np.zeros(shape, np.int64)
                    mask = np.asarray(value)
                    for i, name in enumerate(labels):
                        if name in label_ids and i:
                            pred[mask == i] = label_ids[name]
                    names = [manifest.label_names[k] for k in sorted(manifest.label_names)]
                    a.setdefault("dice", M.DiceCounter(names)).add(pred, gt)
                elif kind == "boxes":
                    world = np.asarray(value.get("world", np.zeros((0, 6)))).reshape(-1, 6)
                    if "queries" in value:
                        found = [str(lab) != "not found" for lab in value.get("labels", [None] * len(world))]
                        by_q = {
                            str(q): b for q, b, ok in zip(value["queries"], world, found) if ok
                        }  # a 'not found' query has no box
                        for les in lesions:
                            box = by_q.get(lesion_phrase(les))
                            a.setdefault("grounding", GroundingCounter()).add(
                                box,
                                lesion_box(les),
                                lambda p, les=les: inside_ellipsoid(p, les.center_mm, les.radii_mm, les.axes),
                            )
                            a.setdefault("ground", []).append(
                                box is not None and bool(M.inside(np.asarray(les.center_mm), box).any())
                            )
                            a.setdefault("ground_floor", []).append(
                                min(1.0, float(M.box_volume(box).sum()) / fov) if box is not None else 0.0
                            )
                    else:
                        centres = [np.asarray(les.center_mm) for les in lesions]
                        scores = np.asarray(value.get("scores", np.ones(len(world))), np.float64).reshape(-1)
                        a.setdefault("detection", DetectionCounter()).add(
                            world,
                            scores,
                            np.stack([lesion_box(les) for les in lesions]) if lesions else np.zeros((0, 6)),
                        )
                        a.setdefault("hits", []).extend(bool(M.inside(c, world).any()) for c in centres)
                        a.setdefault("true", []).extend(any(M.inside(c, b[None]).any() for c in centres) for b in world)
                        if centres:
                            a.setdefault("hit_floor", []).extend(
                                [min(1.0, float(M.box_volume(world).sum()) / fov)] * len(centres)
                            )
                            a.setdefault("prec_floor", []).append(
                                min(
                                    1.0,
                                    len(centres)
                                    * float(np.mean([M.box_volume(lesion_box(les)) for les in lesions]))
                                    / fov,
                                )
                            )
                        else:
                            a.setdefault("clean", []).append(len(world) == 0)
                elif kind == "embedding" and out.get("normalized"):
                    a.setdefault("emb", []).append((attrs["study_uid"], np.asarray(value, np.float32)))
    rows: list[dict[str, Any]] = []
    for name, a in sorted(acc.items()):
        head = a["head"]
        if "probs" in a:
            p, t = np.stack(a["probs"]), np.asarray(a["truth"])
            rows.append(
                _row(head, "classification", f"{a['what']} accuracy", M.accuracy(p, t), M.majority_rate(t), len(t))
            )
            rows.append(_row(head, "classification", f"{a['what']} AUROC", M.auroc(p, t), 0.5, len(t)))
            rows.append(
                _row(
                    head,
                    "classification",
                    f"{a['what']} ECE",
                    M.ece(p, t),
                    None,
                    len(t),
                    "expected calibration error, 10 confidence bins; lower is better",
                )
            )
            if tables is not None:
                tables[f"{head} {a['what']}"] = M.reliability(p, t)
        if "pred" in a:
            t = np.asarray(a["truth"])
            rows.append(
                _row(
                    head,
                    "regression",
                    f"{a['out']['name']} MAE ({a['out'].get('units', '')})",
                    M.mae(np.asarray(a["pred"]), t),
                    M.median_mae(t),
                    len(t),
                )
            )
        if "dice" in a:
            d, f = a["dice"].dice(), a["dice"].floor()
            for label in d:
                if d[label] is not None or f[label]:
                    rows.append(_row(head, "segmentation", f"Dice {label}", d[label], f[label], len(series)))
        if "hits" in a or "clean" in a:
            n = len(a.get("hits", []))
            rows.extend(_detection_rows(head, a["detection"]))
            rows.append(
                _row(
                    head,
                    "localization",
                    "centre-in-box rate (gameable)",
                    np.mean(a["hits"]) if n else None,
                    np.mean(a.get("hit_floor", [0])),
                    n,
                    "a lesion centre inside any box; a volume-sized box always wins",
                )
            )
            rows.append(
                _row(
                    head,
                    "localization",
                    "centre box precision (gameable)",
                    np.mean(a["true"]) if a.get("true") else None,
                    np.mean(a.get("prec_floor", [0])),
                    len(a.get("true", [])),
                )
            )
        if "ground" in a:
            g = a["grounding"]
            for t in IOU_LEVELS:
                rows.append(_row(head, "grounding", f"hit rate IoU>={t}", np.mean(g.hits[t]), None, len(g)))
            rows.append(
                _row(
                    head,
                    "grounding",
                    "pointing game",
                    np.mean(g.pointing),
                    None,
                    len(g),
                    "box centre inside the lesion",
                )
            )
            rows.append(
                _row(
                    head,
                    "grounding",
                    "centre-in-box rate (gameable)",
                    np.mean(a["ground"]),
                    np.mean(a["ground_floor"]),
                    len(a["ground"]),
                    "the lesion centre inside the query's box",
                )
            )
        if "emb" in a:
            rows.extend(_retrieval_rows(head, a["emb"], manifest, model))
    rows.extend(distribution_rows(flags))
    return rows


def distribution_rows(flags: list[bool | None]) -> list[dict[str, Any]]:
    """The share of complete series the model did not flag out of distribution (scored ones only)."""
    scored = [f for f in flags if f is not None]
    if not flags:
        return []
    if not scored:
        return [_row("model", "distribution", "not flagged", None, None, 0, "the model has no distribution statistics")]
    return [_row("model", "distribution", "not flagged", 1 - float(np.mean(scored)), None, len(scored))]


def _detection_rows(head: str, det: DetectionCounter) -> list[dict[str, Any]]:
    """Detection rows: matched at IoU, so a box must fit its lesion to count."""
    n, rows = det.n_truth, []
    for t in IOU_LEVELS:
        rows.append(_row(head, "localization", f"recall IoU>={t}", det.recall(t), None, n))
    rows.append(
        _row(head, "localization", "false boxes per series IoU<0.3", det.false_per_series(0.3), None, det.n_series)
    )
    for rate, value in det.froc(0.3, FROC_RATES).items():
        rows.append(_row(head, "localization", f"FROC recall at {rate:g} false/series IoU>=0.3", value, None, n))
    rows.append(_row(head, "localization", "AP IoU>=0.3", det.average_precision(0.3), None, n))
    rows.append(_row(head, "localization", "mean best IoU", det.mean_best_iou(), None, n))
    clean, n_clean = det.clean_fraction()
    if n_clean:
        rows.append(_row(head, "localization", "lesion-free series with no box", clean, None, n_clean))
    return rows


def _retrieval_rows(head: str, emb: list[tuple[str, np.ndarray]], manifest: Any, model: Any) -> list[dict[str, Any]]:
    from engine.model import load_model  # fitting reaches the run path only when it runs, never at import

    mdl = model if model is not None and not isinstance(model, (str, Path)) else load_model(model)
    tower = mdl.text_tower()
    if tower is None:
        return []
    studies = [s for s in manifest.studies if any(u == s.study_uid for u, _ in emb)]
    reports = tower.encode([s.report for s in studies]).numpy()
    images = np.stack([e for _, e in emb])
    owner = [u for u, _ in emb]
    sim = reports @ images.T  # (studies, series)
    rows = []
    r2s = []
    for i, s in enumerate(studies):
        order = np.argsort(-sim[i], kind="stable")
        r2s.append(next(r for r, j in enumerate(order) if owner[j] == s.study_uid))
    s2r = []
    for j, u in enumerate(owner):
        order = np.argsort(-sim[:, j], kind="stable")
        s2r.append(next(r for r, i in enumerate(order) if studies[i].study_uid == u))
    relevant = [sum(o == s.study_uid for o in owner) for s in studies]
    for k in (1, 5, 10):
        rows.append(
            _row(
                head,
                "retrieval",
                f"report->scan recall@{k}",
                M.recall_at(r2s, k),
                M.random_recall_at(len(owner), relevant, k),
                len(r2s),
            )
        )
    for k in (1, 5, 10):
        rows.append(
            _row(
                head,
                "retrieval",
                f"scan->report recall@{k}",
                M.recall_at(s2r, k),
                M.random_recall_at(len(studies), [1] * len(owner), k),
                len(s2r),
            )
        )
    return rows


def evaluate(
    archive: str | Path,
    *,
    store: str | Path | None = None,
    model: str | Path | None = None,
    heads: list[str] | None = None,
    backend: str = "torch",
    run: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score heads on a synthetic archive (its root: ``dicom/`` and ``ground_truth/``).

    Runs the pipeline into ``store`` (default: ``<archive>/evaluation.zarr``; resumes) unless
    ``run`` is False, then scores it. Returns ``{"archive", "series", "studies", "model", "rows",
    "floors"}``; rows are dicts with head, kind, metric, value, floor, n.
    """
    from engine.plugins import select_heads  # fitting reaches the run path only when it runs, never at import
    from engine.synthetic import ArchiveManifest  # the generated-archive manifest is read only for generated archives

    root = Path(archive)
    manifest = ArchiveManifest.load(root)
    store = Path(store) if store else root / "evaluation.zarr"
    registry = select_heads(heads or None)
    manifests = {name: reg.obj.manifest() for name, reg in registry.items()}
    summary = None
    if run:
        from engine.pipeline import (
            run as run_pipeline,
        )  # fitting reaches the run path only when it runs, never at import

        queries = sorted({lesion_phrase(les) for st in manifest.studies for les in st.lesions})
        summary = run_pipeline(
            [manifest.dicom_root],
            store,
            heads=list(manifests),
            model=model,
            backend=backend,
            queries=queries,
            workers=0,
            overwrite=overwrite,
        )
    from engine.store import open_store  # fitting reaches the run path only when it runs, never at import

    attrs = open_store(store).root.attrs.get("model", {})
    tables: dict[str, Any] = {}
    rows = score_store(store, manifest, manifests, model, tables)
    return {
        "archive": str(root),
        "series": len(manifest.series),
        "studies": len(manifest.studies),
        "model": attrs.get("fingerprint"),
        "rows": rows,
        "floors": FLOORS,
        "reliability": tables,
        "run": None if summary is None else str(getattr(summary, "status", "")),
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Evaluation on {result['series']} series / {result['studies']} studies (model {str(result['model'])[:19]}…)",
        "",
        "| head | kind | metric | value | floor | n |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {r['head']} | {r['kind']} | {r['metric']} | {fmt(r['value'])} | {fmt(r['floor'])} | {r['n']} |"
        )
    for name, table in (result.get("reliability") or {}).items():
        lines += [
            "",
            f"Reliability, {name}: series binned by top-class confidence",
            "",
            "| confidence bin | n | mean confidence | accuracy |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {b['low']:.1f}–{b['high']:.1f} | {b['n']} | {b['confidence']:.3f} | {b['accuracy']:.3f} |"
            for b in table
        ]
    return "\n".join(lines) + "\n"


def write_reports(
    result: dict[str, Any], json_path: str | Path | None = None, md_path: str | Path | None = None
) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if md_path:
        Path(md_path).write_text(to_markdown(result))
