"""Detection and grounding metrics that a box the size of the volume cannot win.

Each predicted box is matched greedily, highest score first, to the unmatched true box it overlaps
most, if that IoU reaches the threshold (the PASCAL VOC / COCO rule). Because the matching runs in
score order, raising the score threshold only drops boxes from the end of each series' list and
never changes whether a kept box is a true or a false positive: one matching per series gives the
whole FROC curve and the precision-recall curve.

- recall@IoU: fraction of true boxes matched by some predicted box;
- false boxes per series: unmatched predicted boxes over the number of series;
- FROC point at f: the best recall reachable with at most f false boxes per series (a score
  threshold over all series, as in the LUNA16 challenge);
- AP: area under the precision-recall curve with precision made monotone (VOC all-point);
- mean best IoU: each true box's highest IoU with any predicted box (0 when there is none);
- clean fraction: series without a true box that get no predicted box;
- grounding hit@IoU: a query's box overlaps its target's box by at least the threshold;
- pointing game: a query's box centre lies inside its target (not just inside its box).

Boxes are (x0, y0, z0, x1, y1, z1) edges in any one frame (world mm here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.token_boxes import box_iou3d

IOU_LEVELS = (0.3, 0.5)
FROC_RATES = (0.5, 1.0, 2.0)


def as_boxes(boxes: np.ndarray | list) -> np.ndarray:
    """(N, 6) float64 boxes with lower edges first, whatever order the corners came in."""
    b = np.asarray(boxes, np.float64).reshape(-1, 6)
    return np.concatenate([np.minimum(b[:, :3], b[:, 3:]), np.maximum(b[:, :3], b[:, 3:])], axis=1)


def greedy_match(
    pred: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Match predictions to truth in score order.

    Returns (order, tp): ``order`` the prediction indices by descending score (ties by index) and
    ``tp[i]`` whether prediction ``order[i]`` matched a true box not matched before.
    """
    pred, truth = as_boxes(pred), as_boxes(truth)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(scores) != len(pred):
        raise ValueError(f"{len(pred)} boxes but {len(scores)} scores")
    order = np.lexsort((np.arange(len(scores)), -scores))
    tp = np.zeros(len(order), bool)
    if not len(truth) or not len(pred):
        return order, tp
    iou = box_iou3d(pred, truth)
    free = np.ones(len(truth), bool)
    for rank, p in enumerate(order):
        cand = np.where(free, iou[p], -1.0)
        best = int(cand.argmax())
        if cand[best] >= iou_threshold:
            tp[rank], free[best] = True, False
    return order, tp


@dataclass
class DetectionCounter:
    """Per-series predictions and truths, pooled into detection metrics."""

    series: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def add(self, pred: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> None:
        """One series: predicted boxes (N, 6) with scores (N,), true boxes (M, 6)."""
        pred = as_boxes(pred)
        scores = np.asarray(scores, np.float64).reshape(-1)
        if len(scores) != len(pred):
            raise ValueError(f"{len(pred)} boxes but {len(scores)} scores")
        self.series.append((pred, scores, as_boxes(truth)))

    @property
    def n_series(self) -> int:
        return len(self.series)

    @property
    def n_truth(self) -> int:
        return sum(len(t) for _, _, t in self.series)

    def _pooled(self, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """All predictions' scores and true-positive flags, pooled over series."""
        scores, tps = [], []
        for pred, s, truth in self.series:
            order, tp = greedy_match(pred, s, truth, iou_threshold)
            scores.append(s[order])
            tps.append(tp)
        return (np.concatenate(scores) if scores else np.zeros(0)), (np.concatenate(tps) if tps else np.zeros(0, bool))

    def recall(self, iou_threshold: float) -> float | None:
        if not self.n_truth:
            return None
        return float(self._pooled(iou_threshold)[1].sum() / self.n_truth)

    def false_per_series(self, iou_threshold: float) -> float | None:
        if not self.n_series:
            return None
        return float((~self._pooled(iou_threshold)[1]).sum() / self.n_series)

    def _curve(self, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative (true, false) positive counts at each distinct score threshold, high to low,
        starting from the empty prediction (0, 0)."""
        scores, tp = self._pooled(iou_threshold)
        order = np.argsort(-scores, kind="stable")
        scores, tp = scores[order], tp[order]
        ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
        last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)  # whole ties only
        return np.r_[0, ctp[last]], np.r_[0, cfp[last]]

    def froc(self, iou_threshold: float, rates: tuple[float, ...] = FROC_RATES) -> dict[float, float | None]:
        """Recall at the score threshold allowing at most ``rate`` false boxes per series."""
        if not self.n_truth or not self.n_series:
            return {r: None for r in rates}
        ctp, cfp = self._curve(iou_threshold)
        return {r: float(ctp[cfp <= r * self.n_series].max() / self.n_truth) for r in rates}

    def average_precision(self, iou_threshold: float) -> float | None:
        if not self.n_truth:
            return None
        ctp, cfp = self._curve(iou_threshold)
        recall = ctp / self.n_truth
        precision = np.divide(ctp, ctp + cfp, out=np.ones(len(ctp)), where=(ctp + cfp) > 0)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or more
        return float(np.sum(np.diff(recall) * envelope[1:]))

    def mean_best_iou(self) -> float | None:
        best = []
        for pred, _, truth in self.series:
            if len(truth):
                best.extend(box_iou3d(truth, pred).max(axis=1) if len(pred) else np.zeros(len(truth)))
        return float(np.mean(best)) if best else None

    def clean_fraction(self) -> tuple[float | None, int]:
        """(fraction of series without a true box that got no box, how many such series)."""
        empty = [len(pred) == 0 for pred, _, truth in self.series if not len(truth)]
        return (float(np.mean(empty)) if empty else None), len(empty)


def inside_ellipsoid(point: np.ndarray, center: np.ndarray, radii: np.ndarray, axes: np.ndarray) -> bool:
    """Whether ``point`` lies in the ellipsoid with the given centre, radii and axes (columns)."""
    local = np.asarray(axes, np.float64).T @ (np.asarray(point, np.float64) - np.asarray(center, np.float64))
    return bool(np.sum((local / np.asarray(radii, np.float64)) ** 2) <= 1.0)


def box_centre(box: np.ndarray) -> np.ndarray:
    b = as_boxes(box)[0]
    return (b[:3] + b[3:]) / 2


@dataclass
class GroundingCounter:
    """One record per (series, query naming a present target)."""

    hits: dict[float, list[bool]] = field(default_factory=lambda: {t: [] for t in IOU_LEVELS})
    pointing: list[bool] = field(default_factory=list)
    centre_in_box: list[bool] = field(default_factory=list)

    def add(self, box: np.ndarray | None, truth_box: np.ndarray, inside_target) -> None:
        """``box`` the query's predicted box or None; ``inside_target(point) -> bool`` the target."""
        if box is None:
            for t in self.hits:
                self.hits[t].append(False)
            self.pointing.append(False)
            self.centre_in_box.append(False)
            return
        iou = float(box_iou3d(as_boxes(box), as_boxes(truth_box))[0, 0])
        for t in self.hits:
            self.hits[t].append(iou >= t)
        self.pointing.append(bool(inside_target(box_centre(box))))
        b, c = as_boxes(box)[0], box_centre(truth_box)
        self.centre_in_box.append(bool(((b[:3] <= c) & (c <= b[3:])).all()))

    def __len__(self) -> int:
        return len(self.pointing)
