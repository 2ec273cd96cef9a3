"""Score the shipped model and heads on a synthetic archive through the real pipeline.

Everything is measured on what ``mrfm run`` writes: stored masks on the native grid against the
ground-truth label maps, stored world boxes against lesion centres, stored scores and values
against the manifest, and ``mrfm search --report`` against each study's own series.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from engine.synthetic import ArchiveManifest, write_demo_archive

from .dataset import CONTRASTS, REGION_LIST, in_field_of_view, labels_on_grid, lesion_phrase

LABELS = ("background", "body", "organ", "fluid", "lesion")


def _inside(point: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    return ((boxes[:, :3] <= point) & (point <= boxes[:, 3:])).all(axis=1)


def evaluate_archive(
    manifest: ArchiveManifest, work: Path, heads: list[str] | None = None, retrieval: bool = True
) -> dict[str, Any]:
    """Run the pipeline (backend torch) over ``manifest``'s archive and score every head."""
    from engine.pipeline import run  # the recipe loads the run path and fitting only when it runs
    from engine.search import search  # the recipe loads the run path and fitting only when it runs
    from engine.store import open_store  # the recipe loads the run path and fitting only when it runs

    queries = sorted({lesion_phrase(les) for st in manifest.studies for les in st.lesions})
    out = work / "eval.zarr"
    summary = run([manifest.dicom_root], out, heads=heads, backend="torch", queries=queries, workers=0, overwrite=True)
    store = open_store(out)
    inter = np.zeros(len(LABELS))
    sizes = np.zeros(len(LABELS))
    region_ok, contrast_ok, vol_err, vol_err_study = [], [], [], []
    loc_hits, loc_boxes_clean, loc_box_true, ground_hits = [], [], [], []
    for key, attrs in store.iter_series():
        if attrs.get("status") != "complete":
            continue
        truth = manifest.series_by_uid(attrs["series_uid"])
        study = manifest.study_by_uid(truth.study_uid)
        shape = tuple(attrs["geometry"]["shape"])
        affine = np.asarray(attrs["geometry"]["affine"], dtype=np.float64)
        visible = [les for les in study.lesions if in_field_of_view(np.asarray([les.center_mm]), affine, shape)[0]]
        heads_here = attrs.get("heads", {})
        if "classify" in heads_here:
            region = store.read_output(key, "classify", "region")
            contrast = store.read_output(key, "classify", "contrast")
            region_ok.append(REGION_LIST[int(np.argmax(region))] == truth.region)
            contrast_ok.append(CONTRASTS[int(np.argmax(contrast))] == truth.contrast)
        if "regress" in heads_here:
            value = float(store.read_output(key, "regress", "lesion_volume"))
            vol_err.append(abs(value - sum(les.volume_ml for les in visible)))
            vol_err_study.append(abs(value - study.lesion_volume_ml))
        if "segment" in heads_here:
            mask = store.read_output(key, "segment", "anatomy")
            gt = labels_on_grid(manifest.root / truth.label_map, affine, shape)
            for c in range(1, len(LABELS)):
                inter[c] += np.count_nonzero((mask == c) & (gt == c))
                sizes[c] += np.count_nonzero(mask == c) + np.count_nonzero(gt == c)
        if "localize" in heads_here:
            boxes = store.read_output(key, "localize", "lesions")["world"]
            for les in visible:
                loc_hits.append(bool(_inside(np.asarray(les.center_mm), boxes).any()))
            if not visible:
                loc_boxes_clean.append(len(boxes) == 0)
            centres = [np.asarray(les.center_mm) for les in visible]
            loc_box_true.extend(any(_inside(c, box).any() for c in centres) for box in boxes)
        if "ground" in heads_here:
            g = store.read_output(key, "ground", "regions")
            by_query = dict(zip([str(q) for q in g["queries"]], g["world"]))
            for les in visible:
                box = by_query.get(lesion_phrase(les))
                ground_hits.append(box is not None and bool(_inside(np.asarray(les.center_mm), box).any()))
    metrics: dict[str, Any] = {"series": len(region_ok) or summary.count("complete")}

    def rate(values: list[bool]) -> float | None:
        return round(float(np.mean(values)), 4) if values else None

    if region_ok:
        metrics["region_accuracy"] = rate(region_ok)
        metrics["contrast_accuracy"] = rate(contrast_ok)
    if vol_err:
        metrics["lesion_volume_mae_ml"] = round(float(np.mean(vol_err)), 3)
        metrics["lesion_volume_mae_ml_study_total"] = round(float(np.mean(vol_err_study)), 3)
    if sizes.any():
        metrics["dice"] = {
            LABELS[c]: round(float(2 * inter[c] / sizes[c]), 4) if sizes[c] else None for c in range(1, len(LABELS))
        }
    if loc_hits or loc_boxes_clean:
        metrics["localize_hit_rate"] = rate(loc_hits)
        metrics["localize_lesions"] = len(loc_hits)
        metrics["localize_box_precision"] = rate(loc_box_true)
        metrics["localize_no_box_when_no_lesion"] = rate(loc_boxes_clean)
    if ground_hits:
        metrics["ground_hit_rate"] = rate(ground_hits)
        metrics["ground_queries"] = len(ground_hits)
    if retrieval and "index" in store.root and "embedding" in store.root["index"]:
        ranks = []
        for study in manifest.studies:
            hits = search(out, report=manifest.root / study.report_path, k=len(manifest.series))
            studies = [h.study_uid for h in hits]
            ranks.append(studies.index(study.study_uid) if study.study_uid in studies else len(studies))
        metrics["retrieval_recall_at_1"] = rate([r < 1 for r in ranks])
        metrics["retrieval_recall_at_5"] = rate([r < 5 for r in ranks])
    return metrics


def evaluate_demo(studies: int = 6, seed: int = 0, log: Any = print) -> dict[str, Any]:
    """Metrics on the demo archive (``mrfm demo-archive`` writes seed 0, 6 studies)."""
    with tempfile.TemporaryDirectory(prefix="mrfm-eval-") as tmp:
        manifest = write_demo_archive(Path(tmp) / "demo", studies=studies, seed=seed)
        metrics = evaluate_archive(manifest, Path(tmp))
    if log:
        log(f"demo archive (seed {seed}, {studies} studies): {metrics}")
    return metrics
