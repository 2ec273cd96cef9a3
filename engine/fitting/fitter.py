"""``fit``: one head fitted on frozen features, measured against the random-encoder floor, and
written as a head package."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import UsageError

from .cache import FeatureCache, random_encoder_model
from .labels import KINDS, archive_root, match, merge_labels, read_labels, split_by_study
from .trainers import Fitted, Options, fit_kind


@dataclass
class FitResult:
    kind: str
    name: str
    fitted: Fitted
    manifest: dict[str, Any]
    floor: dict[str, Any] | None
    package: Path | None
    encoded: int  # views sent through the encoder in this call (0: every feature came from the cache)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.fitted.metrics


def _features(cache: FeatureCache, pairs: list, tiles: bool, log: Callable[[str], None] | None) -> list:
    feats = cache.get_many([ref for ref, _ in pairs], tiles=tiles, log=log)
    return [(f, lab) for f, (_, lab) in zip(feats, pairs)]


def fit(
    kind: str,
    data: str | Path | list[str | Path],
    out: str | Path | None = None,
    *,
    archive: str | Path | None = None,
    model: str | Path | Any | None = None,
    backend: str = "torch",
    name: str | None = None,
    targets: list[str] | None = None,
    classes: list[str] | None = None,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    floor: bool = True,
    steps: int = 0,
    hidden: int = 0,
    lr: float = 0.0,
    version: str = "0.1.0",
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit a ``kind`` head (classify, regress, segment, localize, ground) on the frozen encoder.

    ``data``: a label table (CSV/Parquet, see :mod:`engine.fitting.labels`), a synthetic
    archive's root (its ground truth gives the labels), or a list of either. ``archive``: the images (default: the
    synthetic archive's ``dicom`` folder). Features come from the feature cache, keyed by the
    model fingerprint, so a refit never runs the encoder. Training and validation are split by
    study. With ``floor``, the same head is fit on a randomly initialised encoder of the same
    architecture and measured on the same split. With ``out``, a head package is written there.
    """
    from engine.discover import scan  # fitting reaches the run path only when it runs, never at import
    from engine.model import Model, load_model  # fitting reaches the run path only when it runs, never at import

    from .package import manifest_for, write_package  # fitting reaches the run path only when it runs, never at import

    if kind not in KINDS:
        raise UsageError(f"unknown head kind {kind!r}; choose from {', '.join(KINDS)}")
    t0 = time.perf_counter()
    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    labels = merge_labels([read_labels(d, kind, targets, classes) for d in sources])
    archives = [archive] if archive else [archive_root(d) for d in sources]
    if any(a is None for a in archives):
        raise UsageError("--archive is needed: the folder, zip or files holding the labelled series")
    refs = [r for r in scan([Path(a) for a in archives]).series]
    pairs = match(labels, refs)
    mdl = model if isinstance(model, Model) else load_model(model)
    opt = Options(steps=steps, lr=lr, hidden=hidden, seed=seed, log=log)
    cache = FeatureCache(mdl, cache_dir, backend=backend)
    tiles = kind in ("segment", "localize", "ground")  # the dense heads read the tiles view
    feats = _features(cache, pairs, tiles, log)
    t_feat = time.perf_counter()
    val_studies = split_by_study([lab.study_uid for _, lab in pairs], val_fraction, seed)
    train = [p for p in feats if p[1].study_uid not in val_studies]
    val = [p for p in feats if p[1].study_uid in val_studies]
    if not train:
        raise UsageError("no training series left after the validation split")
    fitted = fit_kind(kind, labels, train, val, opt, mdl)
    t_fit = time.perf_counter()
    floor_metrics = None
    encoded = cache.encoded
    if floor:
        rmodel = random_encoder_model(mdl, seed)
        rcache = FeatureCache(rmodel, cache_dir, backend="torch")
        rfeats = _features(rcache, pairs, tiles, log)
        rtrain = [p for p in rfeats if p[1].study_uid not in val_studies]
        rval = [p for p in rfeats if p[1].study_uid in val_studies]
        floor_metrics = fit_kind(kind, labels, rtrain, rval, opt, rmodel).metrics
        encoded += rcache.encoded
    seconds = {
        "features": round(t_feat - t0, 2),
        "fit": round(t_fit - t_feat, 2),
        "total": round(time.perf_counter() - t0, 2),
    }
    name = name or (Path(out).name if out else kind)
    name = name.lower().replace(" ", "-")
    record = {
        "metrics": fitted.metrics,
        "floor": {"random_encoder": floor_metrics, "seed": seed} if floor else None,
        "data": {
            "labels": labels.source,  # file names or generator and seed: no path of this machine
            "series": len(pairs),
            "studies": len({lab.study_uid for _, lab in pairs}),
            "train_series": len(train),
            "validation_series": len(val),
            "validation_studies": len(val_studies),
        },
        "split": {"by": "study", "validation_fraction": val_fraction, "seed": seed},
        "options": {"steps": steps, "lr": lr, "hidden": hidden, "backend": backend},
    }
    manifest = manifest_for(name, kind, fitted, mdl, record, version)
    package = write_package(out, name, kind, manifest, fitted.state) if out else None
    return FitResult(kind, name, fitted, manifest, floor_metrics, package, encoded, seconds)
