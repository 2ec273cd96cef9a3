"""``mrfm model calibrate``: the statistics behind each series' out-of-distribution flag.

For any model folder (the embedded default, one brought in with ``mrfm model import``), encode an
archive of in-distribution series, pool each series' global-view features (engine.distribution;
by default CLS, token mean and spread, and each exported layer's mean and spread),
fit their mean and a Ledoit-Wolf shrunk covariance on the training studies, and choose the
threshold on the held-out studies so that at least ``keep`` of them are not flagged. Writes
``distribution.safetensors`` beside the card and the card's ``distribution`` section; the model
fingerprint does not change, so heads fit on the model stay valid.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..distribution import LAYER_POOLING, POOLINGS, DistributionModel, pooled
from ..errors import UsageError

STATISTICS_FILE = "distribution.safetensors"


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrinkage of the sample covariance of rows ``x`` towards mu * I.

    Returns (covariance, shrinkage). Well conditioned even with fewer rows than columns, which is
    the usual case here (a few hundred series, 2 x embed_dim features).
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    mu = np.trace(s) / p
    delta = np.sum((s - mu * np.eye(p)) ** 2) / p
    # beta: how far single-sample outer products scatter around s (the estimate's own noise)
    x2 = xc**2
    beta = (np.sum(x2.T @ x2) / n - np.sum(s**2)) / (p * n)
    beta = min(beta, delta)
    shrink = 0.0 if delta == 0 else beta / delta
    return (1 - shrink) * s + shrink * mu * np.eye(p), float(shrink)


def fit_statistics(
    train: np.ndarray, heldout: np.ndarray, keep: float = 0.98
) -> tuple[DistributionModel, dict[str, Any]]:
    """Mean and precision from ``train`` rows; the smallest threshold keeping >= ``keep`` of ``heldout``."""
    if len(train) < 2 or len(heldout) < 1:
        raise UsageError(
            f"calibration needs at least 2 training and 1 held-out series, got {len(train)} and {len(heldout)}"
        )
    cov, shrink = ledoit_wolf(train)
    mean = np.asarray(train, dtype=np.float64).mean(axis=0)
    precision = np.linalg.inv(cov)
    # stored as float32: the threshold is chosen on exactly the statistics a run will load
    mean = mean.astype(np.float32).astype(np.float64)
    precision = ((precision + precision.T) / 2).astype(np.float32).astype(np.float64)
    probe = DistributionModel(mean, precision, math.inf)
    held = np.sort([probe.score(v) for v in heldout])
    k = max(0, math.ceil(keep * len(held)) - 1)
    threshold = float(held[k]) * (1 + 1e-6)  # the k-th held-out score itself is kept
    train_scores = np.array([probe.score(v) for v in train])
    info = {
        "shrinkage": shrink,
        "heldout_scores": {"median": float(np.median(held)), "max": float(held[-1]), "n": len(held)},
        "train_scores": {"median": float(np.median(train_scores)), "max": float(train_scores.max()), "n": len(train)},
        "heldout_kept": float(np.mean(held <= threshold)),
    }
    return DistributionModel(mean, precision, threshold), info


def pooled_rows(
    model: Any,
    refs: list[Any],
    cache_dir: str | Path | None = None,
    backend: str = "torch",
    log: Callable[[str], None] | None = None,
    pooling: str = LAYER_POOLING,
) -> tuple[np.ndarray, list[Any]]:
    """Pooled global-view features of each series (through the feature cache), and the refs kept;
    a series that cannot be loaded is left out with a log line."""
    from .cache import FeatureCache

    cache = FeatureCache(model, cache_dir, backend=backend)
    rows, kept = [], []
    for i, ref in enumerate(refs):
        try:
            f = cache.get(ref)
        except Exception as exc:  # bad input is not calibration data
            if log:
                log(f"left out {ref.key}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        rows.append(pooled(f.cls, f.tokens, dict(zip(f.feature_layers, f.layers)), pooling))
        kept.append(ref)
        if log and (i + 1) % 25 == 0:
            log(f"features: {i + 1}/{len(refs)} series")
    return np.array(rows), kept


def calibrate(
    model_dir: str | Path | None,
    archives: list[str | Path],
    *,
    keep: float = 0.98,
    val_fraction: float = 0.25,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    backend: str = "torch",
    write: bool = True,
    log: Callable[[str], None] | None = None,
    pooling: str = LAYER_POOLING,
) -> dict[str, Any]:
    """Compute and (``write``) store a model's distribution statistics from ``archives``.

    Training and held-out series are split by study (``val_fraction``, ``seed``). Returns the
    card's ``distribution`` section. ``model_dir`` None is the embedded default model.
    """
    from ..discover import scan
    from ..model import CARD_NAME, load_model
    from .labels import split_by_study

    if pooling not in POOLINGS:
        raise UsageError(f"--pooling {pooling}: choose from {', '.join(POOLINGS)}")
    if not 0 < keep <= 1:
        raise UsageError(f"--keep {keep}: give a fraction in (0, 1]")
    model = load_model(model_dir)
    found = scan([Path(a) for a in archives])
    refs = [r for r in found.series if (r.modality or "MR") == "MR"]
    if not refs:
        raise UsageError(f"no MR series found under {', '.join(map(str, archives))}")
    rows, refs = pooled_rows(model, refs, cache_dir, backend, log, pooling)
    studies = sorted({r.study_uid for r in refs})
    if len(studies) < 2:
        raise UsageError(
            f"calibration splits by study and needs at least 2 studies; {', '.join(map(str, archives))} holds {len(studies)}"
        )
    held_studies = split_by_study(studies, val_fraction, seed)
    held = np.array([r.study_uid in held_studies for r in refs])
    stats, info = fit_statistics(rows[~held], rows[held], keep)
    stats = DistributionModel(stats.mean, stats.precision, stats.threshold, pooling)
    section: dict[str, Any] = {
        "statistics": STATISTICS_FILE,
        "pooling": pooling,
        "score": "mahalanobis",
        "threshold": round(stats.threshold, 4),
        "keep_fraction": keep,
        "shrinkage": round(info["shrinkage"], 6),
        "fit": {
            "archives": ["/".join(Path(a).resolve().parts[-2:]) for a in archives],
            "series": len(refs),
            "studies": len(studies),
            "train_series": int((~held).sum()),
            "heldout_series": int(held.sum()),
            "heldout_studies": len(held_studies),
            "split_seed": seed,
            "heldout_kept": round(info["heldout_kept"], 4),
            "heldout_scores": {
                k: round(v, 4) if isinstance(v, float) else v for k, v in info["heldout_scores"].items()
            },
            "train_scores": {k: round(v, 4) if isinstance(v, float) else v for k, v in info["train_scores"].items()},
        },
    }
    if write:
        from safetensors.numpy import save_file

        folder = model.folder
        path = folder / STATISTICS_FILE
        save_file({"mean": stats.mean.astype(np.float32), "precision": stats.precision.astype(np.float32)}, str(path))
        section["statistics_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        card = json.loads((folder / CARD_NAME).read_text())
        card["distribution"] = section
        (folder / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return section
