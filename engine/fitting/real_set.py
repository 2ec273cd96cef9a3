"""A labelled set of real MR series, and how the installed heads score on it.

``build_real_set(out, assets=..., shared=...)`` gathers what can be reached offline into ``out``:
dcm2niix's validation series (``dcm_qa_ts``: one Siemens EPI mosaic; ``dcm_qa_enh``: Philips and
Siemens XA Enhanced MR), pydicom's bundled MR test files, the MNI152 2009 T1 template (nilearn's
wheel) and Colin27 (``ch2``, ``ch2bet``; Debian's mricron-data). Each series is labelled with its
region (all brain), its contrast where the protocol says so, and ``healthy`` (volunteers and
templates). ``out/real_set.json`` lists them; the images are copied beside it, never into the
repository. Missing sources are listed in ``missing`` rather than failing, so the set is what
this machine holds.

``score_real_set(store, real_set)`` scores what ``mrfm run`` stored for it: region accuracy, the
region answers that are wrong with p >= 0.8 and not flagged, Dice of the non-background
segmentation against an independent head mask (Otsu threshold, largest connected component,
holes filled, computed here on the native voxels), the lesion label's fraction of that head mask,
the out-of-distribution flag rate, and localize's boxes per healthy series (each one false).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError

SET_FILE = "real_set.json"
CONFIDENT = 0.8
LESION_HEALTHY_MAX = 0.01
NILEARN_DATA = "nilearn/datasets/data"
MRICRON_TEMPLATES = "usr/share/mricron/templates"


# --- building -----------------------------------------------------------------------------------


def _entry(path: Path, out: Path, source: str, contrast: str | None, note: str = "") -> dict[str, Any]:
    return {
        "path": path.relative_to(out).as_posix(),
        "source": source,
        "region": "brain",
        "contrast": contrast,
        "healthy": True,
        "note": note,
    }


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return dst


def _nilearn_files(assets: Path) -> dict[str, Path]:
    """MNI152 files from an unpacked nilearn wheel or from the wheel itself (read from the zip)."""
    found = {}
    for name in ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",):
        for cand in [assets / NILEARN_DATA / name, *assets.glob(f"**/{NILEARN_DATA}/{name}")]:
            if cand.is_file():
                found[name] = cand
                break
    return found


def build_real_set(
    out: str | Path, *, assets: str | Path | None = None, shared: str | Path | None = None
) -> dict[str, Any]:
    """Write the real set into ``out`` from the sources found; returns its description."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series: list[dict[str, Any]] = []
    missing: list[str] = []
    if shared is not None and Path(shared).is_dir():
        shared = Path(shared)
        ts = shared / "dcm_qa_ts" / "In" / "1.dcm"  # nine syntaxes of one acquisition: one series
        if ts.is_file():
            series.append(
                _entry(
                    _copy(ts, out / "dicom" / "dcm_qa_ts" / "1.dcm").parent,
                    out,
                    "dcm_qa_ts (Siemens EPI mosaic)",
                    None,
                    "EPI BOLD, 64x64x35",
                )
            )
        else:
            missing.append("dcm_qa_ts")
        enh = shared / "dcm_qa_enh" / "In"
        if enh.is_dir():
            for sub in sorted(p for p in enh.iterdir() if p.is_dir()):
                dst = out / "dicom" / "dcm_qa_enh" / sub.name
                shutil.copytree(sub, dst, dirs_exist_ok=True)
                series.append(_entry(dst, out, f"dcm_qa_enh {sub.name} (Enhanced MR)", None))
            for f in sorted(p for p in enh.iterdir() if p.is_file()):
                dst = _copy(f, out / "dicom" / "dcm_qa_enh" / f.stem / f.name)
                series.append(_entry(dst.parent, out, f"dcm_qa_enh {f.name} (Enhanced MR)", None))
        else:
            missing.append("dcm_qa_enh")
    else:
        missing += ["dcm_qa_ts", "dcm_qa_enh"]
    try:
        from pydicom.data import get_testdata_file

        for name, contrast in (("MR_small.dcm", "T1"), ("emri_small.dcm", None)):
            path = get_testdata_file(name)
            if path:
                series.append(
                    _entry(
                        _copy(Path(path), out / "dicom" / "pydicom" / Path(name).stem / name).parent,
                        out,
                        f"pydicom test file {name}",
                        contrast,
                    )
                )
    except ImportError:
        missing.append("pydicom test files")
    if assets is not None and Path(assets).is_dir():
        assets = Path(assets)
        for name, path in _nilearn_files(assets).items():
            series.append(_entry(_copy(path, out / "nifti" / name), out, "MNI152 2009c T1 template (nilearn)", "T1"))
        if not _nilearn_files(assets):
            missing.append("MNI152 (nilearn wheel, unpacked)")
        templates = next(iter(assets.glob(f"**/{MRICRON_TEMPLATES}")), None)
        if templates is not None:
            for name, note in (
                ("ch2.nii.gz", "Colin27 T1 with scalp"),
                ("ch2bet.nii.gz", "Colin27 T1, brain extracted"),
            ):
                if (templates / name).is_file():
                    series.append(
                        _entry(_copy(templates / name, out / "nifti" / name), out, f"{note} (mricron-data)", "T1")
                    )
        else:
            missing.append("Colin27 (mricron-data, unpacked)")
    else:
        missing += ["MNI152 (nilearn wheel)", "Colin27 (mricron-data)"]
    description = {
        "series": series,
        "missing": missing,
        "labels": "region from the protocol (all brain); contrast where the protocol names it; healthy volunteers and templates",
    }
    (out / SET_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description


def is_real_set(root: str | Path) -> bool:
    return (Path(root) / SET_FILE).is_file()


# --- the independent head mask ------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of the histogram."""
    values = np.asarray(values, float).ravel()
    values = values[np.isfinite(values)]
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def head_mask(data: np.ndarray) -> np.ndarray:
    """Otsu threshold, the largest connected component, holes filled (slice by slice too, so a
    ventricle open to one side of a thin slab is still filled)."""
    from scipy import ndimage

    data = np.asarray(data, float)
    mask = data > otsu_threshold(data)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_fill_holes(mask)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


# --- scoring ------------------------------------------------------------------------------------


def _refs_by_entry(root: Path, description: dict[str, Any]) -> dict[str, Any]:
    """Scan the set and map each entry's path to the series found there (one per entry: the first)."""
    from engine.discover import scan

    found = scan([root / e["path"] for e in description["series"]])
    out: dict[str, Any] = {}
    for e in description["series"]:
        target = (root / e["path"]).resolve()
        for ref in found.series:
            paths = [Path(getattr(s, "path", "")).resolve() for s in ref.sources]
            if any(p == target or target in p.parents for p in paths):
                out.setdefault(e["path"], ref)
    return out


def score_real_set(
    root: str | Path,
    store: str | Path,
    *,
    classify: str = "classify",
    segment: str = "segment",
    localize: str = "localize",
) -> dict[str, Any]:
    """Per-series answers and the set's figures (see the module docstring)."""
    from engine.discover import load
    from engine.store import open_store

    root = Path(root)
    if not is_real_set(root):
        raise UsageError(f"{root}: no {SET_FILE} (build one with python -m engine.fitting.real_set OUT)")
    description = json.loads((root / SET_FILE).read_text())
    refs = _refs_by_entry(root, description)
    st = open_store(store)
    per: list[dict[str, Any]] = []
    for e in description["series"]:
        ref = refs.get(e["path"])
        row: dict[str, Any] = {"path": e["path"], "source": e["source"], "status": "not found"}
        per.append(row)
        if ref is None:
            continue
        attrs = st.series_attrs(ref.key) or {}
        row["status"] = attrs.get("status", "missing")
        row["key"] = ref.key
        dist = attrs.get("distribution") or {}
        row["flagged"], row["ood_score"] = dist.get("out_of_distribution"), dist.get("score")
        if row["status"] != "complete":
            continue
        heads = attrs.get("heads") or {}
        if classify in heads and not heads[classify].get("error"):
            scores = np.asarray(st.read_output(ref.key, classify, "region"), float)
            labels = _labels(st, ref.key, classify, "region")
            row["region"], row["region_p"] = labels[int(np.argmax(scores))], round(float(scores.max()), 4)
        if segment in heads and not heads[segment].get("error"):
            mask = np.asarray(st.read_output(ref.key, segment, "anatomy"))
            labels = _labels(st, ref.key, segment, "anatomy")
            head = head_mask(np.asarray(load(ref).data))
            if head.shape == mask.shape:
                row["head_dice"] = round(dice(mask > 0, head), 4)
                lesion = labels.index("lesion") if "lesion" in labels else None
                row["lesion_fraction"] = (
                    round(float((mask == lesion).sum() / max(head.sum(), 1)), 5) if lesion is not None else None
                )
        if localize in heads and not heads[localize].get("error"):
            row["boxes"] = int(len(np.asarray(st.read_output(ref.key, localize, "lesions")["world"]).reshape(-1, 6)))
    return {"series": per, "figures": real_figures(per, description), "missing": description.get("missing", [])}


def _labels(store: Any, key: str, head: str, output: str) -> list[str]:
    import zarr

    arr = zarr.open_array(store=store.root.store, path=f"series/{key}/{head}/{output}", mode="r")
    return list(arr.attrs.get("labels") or [])


def real_figures(per: list[dict[str, Any]], description: dict[str, Any]) -> dict[str, Any]:
    """The set's figures beside the targets of a model that is honest on real MRI."""
    truth = {e["path"]: e for e in description["series"]}
    answered = [r for r in per if "region" in r]
    right = [r["region"] == truth[r["path"]]["region"] for r in answered]
    confident_wrong = [
        r for r, ok in zip(answered, right) if not ok and r["region_p"] >= CONFIDENT and not r.get("flagged")
    ]
    dices = [r["head_dice"] for r in per if r.get("head_dice") is not None]
    healthy = [r for r in per if truth[r["path"]]["healthy"] and r.get("lesion_fraction") is not None]
    flags = [r["flagged"] for r in per if r.get("flagged") is not None]
    boxed = [
        r["boxes"] for r in per if truth[r["path"]]["healthy"] and r.get("boxes") is not None
    ]  # every box is false
    return {
        "series": len(per),
        "complete": sum(r["status"] == "complete" for r in per),
        "region_accuracy": round(float(np.mean(right)), 4) if right else None,
        "confident_wrong_unflagged": len(confident_wrong),
        "median_head_dice": round(float(np.median(dices)), 4) if dices else None,
        "healthy_lesion_le_1pct": round(
            float(np.mean([r["lesion_fraction"] <= LESION_HEALTHY_MAX for r in healthy])), 4
        )
        if healthy
        else None,
        "median_lesion_fraction": round(float(np.median([r["lesion_fraction"] for r in healthy])), 5)
        if healthy
        else None,
        "flag_rate": round(float(np.mean(flags)), 4) if flags else None,
        "healthy_false_boxes_per_series": round(float(np.mean(boxed)), 4) if boxed else None,
        "healthy_without_box": round(float(np.mean([b == 0 for b in boxed])), 4) if boxed else None,
        "targets": {
            "region_accuracy": ">= 0.90",
            "confident_wrong_unflagged": "0 (p >= 0.8)",
            "median_head_dice": ">= 0.85",
            "healthy_lesion_le_1pct": ">= 0.90",
        },
    }


def evaluate_real_set(
    root: str | Path,
    *,
    store: str | Path | None = None,
    model: str | Path | None = None,
    backend: str = "torch",
    run: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the classify, segment and localize heads over the real set (unless ``run`` is False) and score it."""
    root = Path(root)
    store = Path(store) if store else root / "evaluation.zarr"
    if run:
        from engine.pipeline import run as run_pipeline

        description = json.loads((root / SET_FILE).read_text())
        run_pipeline(
            [root / e["path"] for e in description["series"]],
            store,
            heads=["classify", "segment", "localize"],
            model=model,
            backend=backend,
            workers=0,
            overwrite=overwrite,
        )
    return score_real_set(root, store)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build the real evaluation set from the assets this machine holds.")
    ap.add_argument("out")
    ap.add_argument(
        "--assets",
        help="Folder holding the unpacked nilearn wheel and mricron-data package "
        "(python -m engine.default_model.assets fetch DIR)",
    )
    ap.add_argument("--shared", help="Folder holding dcm_qa_ts and dcm_qa_enh (dcm2niix's validation sets)")
    args = ap.parse_args()
    desc = build_real_set(args.out, assets=args.assets, shared=args.shared)
    print(f"{len(desc['series'])} series in {args.out}; missing: {', '.join(desc['missing']) or 'none'}")
