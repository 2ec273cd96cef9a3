"""Labels for fitting: read from a CSV/Parquet table (or derived from a synthetic archive's ground
truth) and matched to the archive's series.

A table has one row per series (classification, regression, segmentation) or per box
(localization, grounding), keyed by ``series_uid`` or ``path`` (a file or folder of the series,
relative to the table's folder); ``study_uid`` is optional (the scan knows it). Per kind:

- ``classify``: one column per output holding class names (``--target`` picks columns; default:
  every other column).
- ``regress``: one numeric column per output.
- ``segment``: ``mask``, a NIfTI label map in the series' world space (any grid: it is resampled
  by world coordinates onto the encoder's view), integer labels, 0 background.
- ``localize``: ``x0, y0, z0, x1, y1, z1``, a box in RAS+ mm (a row with empty box cells marks a
  series with nothing to find); optional ``label``.
- ``grounding`` (kind ``ground``): ``text`` and the box of what it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UsageError

KINDS = ("classify", "regress", "segment", "localize", "ground")
KEYS = ("series_uid", "path", "study_uid")
BOX = ("x0", "y0", "z0", "x1", "y1", "z1")


@dataclass
class SeriesLabels:
    """Everything known about one series' targets."""

    series_uid: str | None = None
    path: Path | None = None
    study_uid: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # classify/regress: column -> value
    mask: Path | None = None  # segment
    boxes: list[np.ndarray] = field(default_factory=list)  # localize/ground: (6,) RAS mm, x0 < x1
    texts: list[str] = field(default_factory=list)  # ground: one per box


@dataclass
class LabelSet:
    kind: str
    series: list[SeriesLabels]
    targets: list[str] = field(default_factory=list)  # classify/regress columns
    classes: list[str] = field(default_factory=list)  # segment label names, background first
    source: str = ""


def _rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq  # heavy: loaded only by the code path that reads or writes that format

        return pq.read_table(str(path)).to_pylist()
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        import pyarrow.csv as pcsv  # heavy: loaded only by the code path that reads or writes that format

        opts = pcsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        conv = pcsv.ConvertOptions(
            strings_can_be_null=True, column_types={"series_uid": "string", "study_uid": "string"}
        )
        return pcsv.read_csv(str(path), parse_options=opts, convert_options=conv).to_pylist()
    raise UsageError(f"{path}: labels must be a .csv, .tsv or .parquet table")


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())


def read_labels(
    path: str | Path, kind: str, targets: list[str] | None = None, classes: list[str] | None = None
) -> LabelSet:
    """Read a label table for ``kind``; errors name the file and what is missing."""
    if kind not in KINDS:
        raise UsageError(f"unknown head kind {kind!r}; choose from {', '.join(KINDS)}")
    path = Path(path)
    if path.is_dir():
        return demo_labels(path, kind, targets)
    rows = _rows(path)
    if not rows:
        raise UsageError(f"{path}: no rows")
    cols = list(rows[0])
    if "series_uid" not in cols and "path" not in cols:
        raise UsageError(f"{path}: needs a 'series_uid' or 'path' column (has {', '.join(cols)})")
    need = {"segment": ["mask"], "localize": list(BOX), "ground": ["text", *BOX]}.get(kind, [])
    missing = [c for c in need if c not in cols]
    if missing:
        raise UsageError(f"{path}: {kind} labels need columns {', '.join(missing)}")
    if kind in ("classify", "regress"):
        targets = targets or [c for c in cols if c not in KEYS]
        if not targets or any(t not in cols for t in targets):
            raise UsageError(f"{path}: target columns {targets} not all in {cols}")
    by_series: dict[tuple, SeriesLabels] = {}
    for n, row in enumerate(rows, start=2):
        uid = None if _empty(row.get("series_uid")) else str(row["series_uid"])
        p = None if _empty(row.get("path")) else (path.parent / str(row["path"])).resolve()
        if uid is None and p is None:
            raise UsageError(f"{path}:{n}: neither series_uid nor path")
        s = by_series.setdefault(
            (uid, p), SeriesLabels(uid, p, None if _empty(row.get("study_uid")) else str(row["study_uid"]))
        )
        if kind in ("classify", "regress"):
            for t in targets or []:
                v = row.get(t)
                if _empty(v):
                    continue
                s.values[t] = str(v) if kind == "classify" else float(v)
        elif kind == "segment":
            s.mask = (path.parent / str(row["mask"])).resolve()
        else:
            if all(_empty(row.get(c)) for c in BOX):
                continue
            box = np.asarray([float(row[c]) for c in BOX])
            s.boxes.append(np.concatenate([np.minimum(box[:3], box[3:]), np.maximum(box[:3], box[3:])]))
            if kind == "ground":
                s.texts.append(str(row["text"]))
    return LabelSet(kind, list(by_series.values()), list(targets or []), list(classes or []), path.name)


# --- synthetic archives -----------------------------------------------------------------------


def lesion_phrase(lesion: Any) -> str:
    """The short query naming one lesion, as a reader would type it: '<size> mm lesion in the <location>'."""
    return f"{max(lesion.radii_mm) * 2:.0f} mm lesion in the {lesion.location}"


def lesion_box(lesion: Any) -> np.ndarray:
    """World-axis bounding box (6,) of a lesion's ellipsoid (its axes are the columns of ``axes``)."""
    half = np.sqrt(((np.asarray(lesion.axes) * np.asarray(lesion.radii_mm)[None, :]) ** 2).sum(axis=1))
    c = np.asarray(lesion.center_mm)
    return np.concatenate([c - half, c + half])


def in_field_of_view(points: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Which world points lie within a grid's voxels (half-voxel margins included)."""
    from engine.geometry import world_to_voxel  # fitting reaches the run path only when it runs, never at import

    vox = world_to_voxel(affine, np.asarray(points, dtype=np.float64).reshape(-1, 3))
    return ((vox >= -0.5) & (vox <= np.asarray(shape[:3]) - 0.5)).all(axis=1)


def visible_lesions(manifest: Any, series: Any) -> list[Any]:
    """The study's lesions whose centre lies in the series' field of view."""
    study = manifest.study_by_uid(series.study_uid)
    return [
        les
        for les in study.lesions
        if in_field_of_view(np.asarray([les.center_mm]), series.affine_array, series.shape)[0]
    ]


def demo_labels(root: str | Path, kind: str, targets: list[str] | None = None) -> LabelSet:
    """Labels of a synthetic archive (``mrfm demo-archive`` / ``write_demo_archive``) from its
    ground truth: region and contrast, total visible lesion volume (mL), the anatomy label map,
    lesion boxes, and lesion phrases with their boxes."""
    from engine.synthetic import ArchiveManifest  # the generated-archive manifest is read only for generated archives

    known = {"classify": ["region", "contrast"], "regress": ["lesion_volume"]}.get(kind, [])
    if targets and any(t not in known for t in targets):
        raise UsageError(
            f"{root}: the synthetic ground truth has no target(s) {sorted(set(targets) - set(known))} "
            f"for {kind} (it has {', '.join(known) or 'none'})"
        )
    targets = list(targets or known)
    manifest = ArchiveManifest.load(Path(root))
    out = []
    for s in manifest.series:
        lab = SeriesLabels(series_uid=s.series_uid, study_uid=s.study_uid)
        lesions = visible_lesions(manifest, s)
        if kind == "classify":
            lab.values = {t: {"region": s.region, "contrast": s.contrast}[t] for t in targets}
        elif kind == "regress":
            lab.values = {"lesion_volume": float(sum(les.volume_ml for les in lesions))}
        elif kind == "segment":
            lab.mask = manifest.root / s.label_map
        else:
            lab.boxes = [lesion_box(les) for les in lesions]
            lab.texts = [lesion_phrase(les) for les in lesions]
        out.append(lab)
    classes = [manifest.label_names[k] for k in sorted(manifest.label_names)] if kind == "segment" else []
    return LabelSet(kind, out, targets, classes, f"synthetic ground truth (engine.synthetic, seed {manifest.seed})")


def merge_labels(sets: list[LabelSet]) -> LabelSet:
    """One label set from several of the same kind (e.g. one per synthetic archive)."""
    if len(sets) == 1:
        return sets[0]
    first = sets[0]
    return LabelSet(
        first.kind,
        [s for ls in sets for s in ls.series],
        first.targets,
        first.classes,
        "; ".join(str(ls.source) for ls in sets),
    )


def archive_root(data: str | Path) -> Path | None:
    """The DICOM folder of a synthetic archive given its root, else None."""
    p = Path(data)
    return p / "dicom" if p.is_dir() and (p / "ground_truth" / "manifest.json").is_file() else None


# --- matching ---------------------------------------------------------------------------------


def match(labels: LabelSet, refs: list[Any]) -> list[tuple[Any, SeriesLabels]]:
    """Pair each labelled series with the scanned series it names; unmatched labels are an error."""
    by_uid = {r.series_uid: r for r in refs}
    pairs, unmatched = [], []
    for lab in labels.series:
        ref = by_uid.get(lab.series_uid) if lab.series_uid else None
        if ref is None and lab.path is not None:
            for r in refs:
                paths = {Path(s.path).resolve() for s in r.sources}
                if lab.path in paths or any(lab.path in p.parents for p in paths):
                    ref = r
                    break
        if ref is None:
            unmatched.append(lab.series_uid or str(lab.path))
            continue
        lab.study_uid = lab.study_uid or ref.study_uid
        pairs.append((ref, lab))
    if unmatched:
        raise UsageError(f"{len(unmatched)} labelled series are not in the archive, e.g. {unmatched[0]}")
    if not pairs:
        raise UsageError("no labelled series found in the archive")
    return pairs


def split_by_study(studies: list[str], val_fraction: float = 0.25, seed: int = 0) -> set[str]:
    """The validation studies: a seeded fraction of the distinct studies (at least one when there
    are two or more), so no study has series on both sides."""
    unique = sorted(set(studies))
    if len(unique) < 2:
        return set()
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i] for i in order[:n_val]}
