"""Is a series like what the model was trained on? The out-of-distribution score of one series.

A model card may carry ``distribution``: the mean and a shrunk (Ledoit-Wolf) covariance's inverse
of pooled encoder features (CLS and mean patch token of the global view, or with ``LAYER_POOLING``
also the tokens' spread and each exported layer's mean and spread) over training series, in a
safetensors file beside the card, and a threshold chosen on held-out series (``mrfm model
calibrate``). A series' score is the Mahalanobis distance of its pooled features from that mean;
above the threshold it is flagged ``out_of_distribution``. Heads still run on a flagged series:
the flag tells a reader that their answers are guesses. The statistics are not part of the model
fingerprint (they change no feature and no head output), so calibrating never orphans a head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .features import Features

POOLING = "cls+mean_token"
# Also the spread of the tokens and each exported layer's token mean and spread: foreign inputs
# (noise, blank, photographs) differ from MR more in how their tokens vary than in their average.
LAYER_POOLING = "cls+token_mean_std+layer_mean_std"
POOLINGS = (POOLING, LAYER_POOLING)
UNSCORED: dict[str, Any] = {"score": None, "threshold": None, "out_of_distribution": None}


def pooled(cls: Any, tokens: Any, layers: dict[int, Any] | None = None, pooling: str = POOLING) -> np.ndarray:
    """The pooled feature vector the statistics describe: concat(CLS, mean patch token), and for
    ``LAYER_POOLING`` the tokens' standard deviation and each layer's (by index) mean and deviation."""
    cls = np.asarray(cls, dtype=np.float64).reshape(-1)
    tokens = np.asarray(tokens, dtype=np.float64).reshape(-1, cls.shape[0])
    parts = [cls, tokens.mean(axis=0)]
    if pooling == LAYER_POOLING:
        parts.append(tokens.std(axis=0))
        for i in sorted(layers or {}):
            layer = np.asarray(layers[i], dtype=np.float64).reshape(-1, cls.shape[0])  # type: ignore[index]
            parts += [layer.mean(axis=0), layer.std(axis=0)]
    return np.concatenate(parts)


def pooled_dim(embed_dim: int, n_layers: int, pooling: str) -> int:
    return embed_dim * (2 if pooling == POOLING else 3 + 2 * n_layers)


def pooled_features(features: list[Features], pooling: str = POOLING) -> np.ndarray:
    """Pooled vector of a view, averaged over its windows (a global view has one)."""

    def arr(t: Any) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    vecs = [
        pooled(arr(f.cls), arr(f.tokens), {i: arr(t) for i, t in (f.layers or {}).items()}, pooling) for f in features
    ]
    return np.mean(vecs, axis=0)


@dataclass(frozen=True)
class DistributionModel:
    """Mean, precision (inverse shrunk covariance) and threshold of a model's training features."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    pooling: str = POOLING

    def score(self, vector: np.ndarray) -> float:
        d = np.asarray(vector, dtype=np.float64) - self.mean
        return float(np.sqrt(max(float(d @ self.precision @ d), 0.0)))

    def judge(self, vector: np.ndarray | None) -> dict[str, Any]:
        """The ``distribution`` record of one series (unscored when no vector could be pooled)."""
        if vector is None:
            return dict(UNSCORED)
        if not np.all(np.isfinite(vector)):  # features no training series ever had
            return {"score": None, "threshold": round(self.threshold, 4), "out_of_distribution": True}
        s = self.score(vector)
        return {
            "score": round(s, 4),
            "threshold": round(self.threshold, 4),
            "out_of_distribution": bool(s > self.threshold),
        }


def load_distribution(card: dict[str, Any], folder: str | Path) -> DistributionModel | None:
    """The card's statistics, or None when it has none. A card naming a missing or mis-shaped
    statistics file is an error: a silently unscored run would hide that."""
    section = card.get("distribution")
    if not section:
        return None
    from safetensors.numpy import load_file

    path = Path(folder) / section["statistics"]
    if not path.is_file():
        raise FileNotFoundError(f"model folder {folder}: distribution statistics {section['statistics']} are missing")
    tensors = load_file(str(path))
    mean, precision = tensors.get("mean"), tensors.get("precision")
    pooling = section.get("pooling", POOLING)
    if pooling not in POOLINGS:
        raise UsageError(f"distribution pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    dim = pooled_dim(int(card["encoder"]["embed_dim"]), len(card["encoder"].get("feature_layers") or []), pooling)
    if mean is None or precision is None or mean.shape != (dim,) or precision.shape != (dim, dim):
        raise UsageError(f"distribution statistics {path} must hold 'mean' ({dim},) and 'precision' ({dim}, {dim})")
    return DistributionModel(
        mean.astype(np.float64), precision.astype(np.float64), float(section["threshold"]), pooling
    )


def unscored_warning(model_name: str) -> str:
    return (
        f"model {model_name!r} has no distribution statistics: every series records distribution score null "
        "(mrfm model calibrate MODEL ARCHIVE computes them)"
    )


def distribution_for(model: Any) -> tuple[DistributionModel | None, list[str]]:
    """A loaded model's statistics and the run's one warning when it has none; a card whose
    statistics cannot be read is a usage error before any series is touched."""
    from .errors import UsageError

    try:
        stats = load_distribution(model.card, model.folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"model {model.name!r}: {exc}") from exc
    return stats, ([] if stats is not None else [unscored_warning(model.name)])
