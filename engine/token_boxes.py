"""Boxes from maps over a head's token grid or view, shared by the built-in localisation and
grounding heads and the heads ``mrfm fit`` writes: 3D IoU and non-maximum suppression, basins of
a token map by hill climbing, growth of a region from its peak, and a region's box in the view's
continuous voxel coordinates (voxel centres at integers; see :class:`engine.HeadInput`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["basin_boxes", "basins", "box_iou3d", "grow_from_peak", "nms3d", "region_boxes"]


def box_iou3d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes (N, 6) and (M, 6) given as (i0, j0, k0, i1, j1, k1) edges -> (N, M)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 6), np.asarray(b, np.float64).reshape(-1, 6)
    lo = np.maximum(a[:, None, :3], b[None, :, :3])
    hi = np.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = np.clip(hi - lo, 0, None).prod(axis=-1)
    vol_a = np.clip(a[:, 3:] - a[:, :3], 0, None).prod(axis=-1)
    vol_b = np.clip(b[:, 3:] - b[:, :3], 0, None).prod(axis=-1)
    union = vol_a[:, None] + vol_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms3d(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first.

    A box is dropped when its IoU with an already kept, higher-scoring box exceeds the threshold.
    Equal scores keep the lower index first, so the result does not depend on sort stability.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    order = np.lexsort((np.arange(len(scores)), -scores))
    iou = box_iou3d(boxes, boxes)[np.ix_(order, order)]
    suppressed = np.zeros(len(order), dtype=bool)
    for pos in range(len(order)):
        if not suppressed[pos]:
            suppressed[pos + 1 :] |= iou[pos, pos + 1 :] > iou_threshold
    return order[~suppressed]


@lru_cache(maxsize=8)
def _neighbours(grid: tuple[int, int, int]) -> np.ndarray:
    """(N, 27) flat indices of each token's 3x3x3 neighbourhood; off-grid neighbours map to itself."""
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=1)
    offsets = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    nb = coords[:, None, :] + offsets[None]
    inside = ((nb >= 0) & (nb < np.asarray(grid))).all(axis=-1)
    flat = np.ravel_multi_index(tuple(np.clip(nb, 0, np.asarray(grid) - 1).transpose(2, 0, 1)), grid)
    table = np.where(inside, flat, np.arange(len(coords))[:, None])
    table.setflags(write=False)  # shared through the cache
    return table


def basins(prob: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Group tokens with prob >= threshold by the local maximum they climb to.

    prob (gx, gy, gz) -> (peak flat index per basin (P,), basin id per token (N,), -1 below threshold).
    Ties are broken by flat index, so every climb is strictly uphill and terminates.
    """
    flat = prob.reshape(-1)
    n = len(flat)
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), flat))] = np.arange(n)
    nb = _neighbours(tuple(prob.shape))
    parent = nb[np.arange(n), rank[nb].argmax(axis=1)]
    while True:  # pointer jumping: each step doubles the distance climbed
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            break
        parent = jumped
    fg = flat >= threshold
    peaks, inverse = np.unique(parent[fg], return_inverse=True)
    basin = np.full(n, -1, dtype=np.int64)
    basin[fg] = inverse
    return peaks, basin


def basin_boxes(prob: np.ndarray, threshold: float, image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (P, 6) in image voxel edges around each basin, and each basin's peak probability (P,)."""
    peaks, basin = basins(prob, threshold)
    if len(peaks) == 0:
        return np.zeros((0, 6)), np.zeros(0)
    grid = np.asarray(prob.shape)
    coords = np.stack(np.unravel_index(np.arange(basin.size), prob.shape), axis=1)
    fg = basin >= 0
    lo = np.full((len(peaks), 3), np.iinfo(np.int64).max)
    hi = np.full((len(peaks), 3), -1)
    np.minimum.at(lo, basin[fg], coords[fg])
    np.maximum.at(hi, basin[fg], coords[fg])
    patch = np.asarray(image_shape, np.float64) / grid
    boxes = np.concatenate([lo * patch - 0.5, (hi + 1) * patch - 0.5], axis=1)
    return boxes, prob.reshape(-1)[peaks]


def grow_from_peak(mask: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The 26-connected part of ``mask`` reachable from ``seed``; both (Q, gx, gy, gz) bool."""
    region = (seed & mask).float()[:, None]
    allowed = mask.float()[:, None]
    while True:
        grown = F.max_pool3d(region, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, region):
            return region[:, 0].bool()
        region = grown


def region_boxes(region: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Boxes (Q, 6) in image voxel edges around each query's non-empty token region (Q, gx, gy, gz)."""
    patch = np.asarray(image_shape, np.float64) / np.asarray(region.shape[1:])
    boxes = np.empty((len(region), 6))
    for q, tokens in enumerate(region):
        coords = np.argwhere(tokens)
        boxes[q] = np.concatenate([coords.min(axis=0) * patch - 0.5, (coords.max(axis=0) + 1) * patch - 0.5])
    return boxes
