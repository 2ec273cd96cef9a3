"""The paper's metrics per head kind, and the chance floors they are reported beside."""

from __future__ import annotations

from math import comb

import numpy as np

from engine.token_boxes import box_iou3d as box_iou  # noqa: F401 (pairwise 3D IoU, as the heads compute it)


def accuracy(probs: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == truth)) if len(truth) else float("nan")


def auroc_binary(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic, ties averaged."""
    from scipy.stats import rankdata  # heavy: loaded only by the code path that reads or writes that format

    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(probs: np.ndarray, truth: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``truth``."""
    values = [auroc_binary(probs[:, c], truth == c) for c in range(probs.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def majority_rate(truth: np.ndarray) -> float:
    """Chance floor for accuracy: always answering the most frequent class."""
    if not len(truth):
        return float("nan")
    return float(np.bincount(np.asarray(truth, int)).max() / len(truth))


def mae(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(truth))))


def median_mae(truth: np.ndarray) -> float:
    """Chance floor for MAE: always answering the median."""
    truth = np.asarray(truth, float)
    return mae(np.full_like(truth, np.median(truth)), truth)


class DiceCounter:
    """Pooled Dice per label over many volumes (intersections and sizes summed, then divided)."""

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.inter = np.zeros(len(labels))
        self.sizes = np.zeros(len(labels))
        self.truth = np.zeros(len(labels))
        self.voxels = 0

    def add(self, pred: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> None:
        if where is not None:
            pred, truth = pred[where], truth[where]
        self.voxels += truth.size
        for c in range(1, len(self.labels)):
            p, t = pred == c, truth == c
            self.inter[c] += np.count_nonzero(p & t)
            self.sizes[c] += np.count_nonzero(p) + np.count_nonzero(t)
            self.truth[c] += np.count_nonzero(t)

    def dice(self) -> dict[str, float | None]:
        return {
            self.labels[c]: (round(float(2 * self.inter[c] / self.sizes[c]), 4) if self.sizes[c] else None)
            for c in range(1, len(self.labels))
        }

    def floor(self) -> dict[str, float | None]:
        """Chance floor: labelling each voxel at random with the true label frequencies gives an
        expected Dice equal to the label's voxel fraction."""
        return {
            self.labels[c]: (round(float(self.truth[c] / self.voxels), 4) if self.voxels else None)
            for c in range(1, len(self.labels))
        }


def inside(point: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    return ((boxes[:, :3] <= point) & (point <= boxes[:, 3:])).all(axis=1)


def box_volume(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 6)
    return np.clip(boxes[:, 3:] - boxes[:, :3], 0, None).prod(axis=-1)


def recall_at(ranks: list[int], k: int) -> float:
    """Fraction of queries whose first relevant item ranks within the top k (ranks from 0)."""
    return float(np.mean([r < k for r in ranks])) if ranks else float("nan")


def random_recall_at(n_items: int, n_relevant: list[int], k: int) -> float:
    """Chance floor for recall@k: a random ranking of ``n_items`` puts at least one of a query's
    ``m`` relevant items in the top k with probability 1 - C(n - m, k) / C(n, k)."""
    if not n_relevant:
        return float("nan")
    k = min(k, n_items)
    return float(np.mean([1 - comb(n_items - m, k) / comb(n_items, k) for m in n_relevant]))


def r4(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else round(float(x), 4)


def reliability(probs: np.ndarray, truth: np.ndarray, bins: int = 10) -> list[dict[str, float | int]]:
    """Reliability table: series binned by top-class confidence into ``bins`` equal-width bins,
    each with its count, mean confidence and accuracy (empty bins left out)."""
    probs, truth = np.asarray(probs, float), np.asarray(truth, int)
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        inb = which == b
        if inb.any():
            rows.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(inb.sum()),
                    "confidence": float(conf[inb].mean()),
                    "accuracy": float(right[inb].mean()),
                }
            )
    return rows


def ece(probs: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the
    reliability table's bins (Guo et al. 2017, equal-width top-class confidence bins)."""
    table = reliability(probs, truth, bins)
    n = sum(r["n"] for r in table)
    return float(sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in table) / n) if n else float("nan")


def fit_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(logits / T) on
    held-out rows (Guo et al. 2017): a 1-D convex problem in log T, solved by bounded search."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits, truth = np.asarray(logits, float), np.asarray(truth, int)
    ok = truth >= 0
    logits, truth = logits[ok], truth[ok]
    if not len(truth):
        return 1.0

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(truth)), truth].mean())

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(50.0)), method="bounded")
    return float(np.exp(best.x))
