"""Mapping head outputs from view space back to the native grid and world coordinates.

Heads never do geometry: they return masks as probabilities over view voxels and boxes in view
voxel coordinates (voxel centres at integers). This module blends sliding-window tiles, resamples
probabilities onto the series' native grid (argmax or threshold there, covering every native
voxel whose centre lies in the view's field of view) and converts boxes to RAS mm and native
voxel coordinates in the same continuous convention.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from .geometry import apply_affine, world_bounds, world_to_voxel


def gaussian_importance(shape: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights peaking at a window's centre, so tile borders count least when blending."""
    axes = []
    for n in shape:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        # floor each axis, not the product: a floored product would give every tile the same
        # weight in volume corners and bring back the seams blending is meant to remove
        axes.append(np.maximum(np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2), 1e-3))
    return (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).astype(np.float32)


def blend_windows(
    probs: list[np.ndarray], windows: list[tuple[slice, slice, slice]], shape: tuple[int, int, int]
) -> np.ndarray:
    """Gaussian-weighted average of per-window probabilities (C, x, y, z) over a grid of ``shape``."""
    channels = probs[0].shape[0]
    acc = np.zeros((channels, *shape), dtype=np.float32)
    weight = np.zeros(shape, dtype=np.float32)
    importance = gaussian_importance(probs[0].shape[1:])
    for p, win in zip(probs, windows):
        acc[(slice(None), *win)] += p * importance
        weight[win] += importance
    return acc / np.maximum(weight, np.finfo(np.float32).tiny)


EDGE_TOLERANCE = 1e-4  # voxels: a centre this close outside an edge still counts as inside


def inside_fov(
    shape: tuple[int, ...], affine: np.ndarray, fov_shape: tuple[int, ...], fov_affine: np.ndarray
) -> np.ndarray:
    """Which voxels of the grid (``shape``, ``affine``) have their centre inside the field of
    view of the grid (``fov_shape``, ``fov_affine``), edges included.

    A grid's field of view is its voxels with their half-voxel extent: continuous indices
    within [-0.5, n - 0.5] on every axis.
    """
    m = np.linalg.inv(fov_affine) @ np.asarray(affine, dtype=np.float64)
    lo = -0.5 - EDGE_TOLERANCE
    hi = (np.asarray(fov_shape[:3], dtype=np.float64) - 0.5 + EDGE_TOLERANCE)[:, None]
    jk = np.indices(shape[1:3]).reshape(2, -1).astype(np.float64)
    plane = m[:3, 1:3] @ jk + m[:3, 3:4]  # coordinates of slab i = 0; slabs keep memory small
    out = np.empty(shape, dtype=bool)
    for i in range(shape[0]):
        c = plane + m[:3, 0:1] * i
        out[i] = ((c >= lo) & (c <= hi)).all(axis=0).reshape(shape[1:3])
    return out


def resample_probabilities(
    probs: np.ndarray,
    view_affine: np.ndarray,
    native_shape: tuple[int, int, int],
    native_affine: np.ndarray,
    background_channel: bool = True,
) -> np.ndarray:
    """Trilinearly resample view probabilities (C, X, Y, Z) onto the native grid.

    Every native voxel whose centre lies inside the view's field of view gets a value, edges
    included: within the outer half view-voxel the nearest edge value is used (clamped, not
    dropped). Native voxels outside the view are background: probability 1 for channel 0 when
    ``background_channel`` (softmax masks), 0 in every channel otherwise (sigmoid masks).
    """
    # native voxel -> world -> view voxel, as one affine
    m = np.linalg.inv(view_affine) @ native_affine
    outside = ~inside_fov(native_shape, native_affine, probs.shape[1:], view_affine)
    out = np.empty((probs.shape[0], *native_shape), dtype=np.float32)
    for c in range(probs.shape[0]):
        out[c] = ndimage.affine_transform(
            np.asarray(probs[c], dtype=np.float32),
            m[:3, :3],
            offset=m[:3, 3],
            output_shape=tuple(native_shape),
            order=1,
            mode="nearest",
        )
        out[c][outside] = 1.0 if (background_channel and c == 0) else 0.0
    return out


def mask_to_native(
    probs: np.ndarray,
    view_affine: np.ndarray,
    native_shape: tuple[int, int, int],
    native_affine: np.ndarray,
    dtype: str = "uint8",
    mode: str = "softmax",
    threshold: float = 0.5,
) -> np.ndarray:
    """A head's mask on the native grid, from its probabilities resampled there.

    ``softmax``: label map, the argmax over the channels (label 0 = background).
    ``sigmoid``: one foreground channel, stored as a 0/1 label map (p >= ``threshold``).
    ``multilabel``: one independent channel per label, stored (C, I, J, K) as 0/1 each.
    """
    native = resample_probabilities(
        probs, view_affine, native_shape, native_affine, background_channel=mode == "softmax"
    )
    if mode == "softmax":
        return np.argmax(native, axis=0).astype(dtype)
    fg = native >= threshold
    return (fg[0] if mode == "sigmoid" else fg).astype(dtype)


def _box_corners(box: np.ndarray) -> np.ndarray:
    lo, hi = box[:3], box[3:]
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def boxes_to_native(
    boxes: np.ndarray, view_affine: np.ndarray, native_shape: tuple[int, int, int], native_affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map view-voxel boxes (N, 6) to world RAS mm and native voxel boxes, clipped to the series.

    Returns (world (M, 6), voxel (M, 6), keep (M,) indices of the input boxes that overlap the
    series); world boxes lie inside the series' world bounds.
    """
    series_world = world_bounds(native_shape, native_affine)
    vox_lo, vox_hi = np.full(3, -0.5), np.asarray(native_shape[:3], dtype=np.float64) - 0.5
    world_out, voxel_out, keep = [], [], []
    for n, box in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 6)):
        world_pts = apply_affine(view_affine, _box_corners(box))
        w = np.concatenate([world_pts.min(0), world_pts.max(0)])
        w = np.concatenate([np.maximum(w[:3], series_world[:3]), np.minimum(w[3:], series_world[3:])])
        v_pts = world_to_voxel(native_affine, world_pts)
        v = np.concatenate([np.maximum(v_pts.min(0), vox_lo), np.minimum(v_pts.max(0), vox_hi)])
        if (w[3:] < w[:3]).any() or (v[3:] < v[:3]).any():
            continue  # the box lies in padding outside the acquired field of view
        world_out.append(w)
        voxel_out.append(v)
        keep.append(n)
    return (
        np.asarray(world_out, dtype=np.float64).reshape(-1, 6),
        np.asarray(voxel_out, dtype=np.float64).reshape(-1, 6),
        np.asarray(keep, dtype=np.int64),
    )


def merge_window_boxes(values: list[dict], windows: list[tuple[slice, slice, slice]], iou: float = 0.3) -> dict:
    """Box outputs of several windows of one view as one output in view voxel coordinates.

    Each window's boxes are shifted by the window's origin. Boxes carrying ``queries`` keep one
    box per query, the highest-scoring; other boxes overlapping a higher-scoring box from any
    window by more than ``iou`` are dropped (windows overlap, so one lesion can be seen twice).
    """
    from .token_boxes import nms3d  # boxes only; masks never need it

    boxes: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    extras: dict[str, list] = {k: [] for k in ("labels", "queries") if all(k in v for v in values)}
    for v, win in zip(values, windows):
        b = np.asarray(v["boxes"], np.float64).reshape(-1, 6)
        origin = np.asarray([s.start for s in win] * 2, np.float64)
        boxes.append(b + origin)
        scores.append(np.asarray(v["scores"], np.float64).reshape(-1))
        for k in extras:
            extras[k].extend(v[k])
    all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
    order = np.lexsort((np.arange(len(all_scores)), -all_scores))
    if "queries" in extras:
        best: dict[str, int] = {}
        for i in order:  # highest score first: the first box of a query is its best
            best.setdefault(extras["queries"][i], int(i))
        keep = sorted(best.values(), key=lambda i: list(order).index(i))
    else:
        keep = list(nms3d(all_boxes, all_scores, iou)) if len(all_boxes) else []
    out: dict[str, Any] = {
        "boxes": all_boxes[keep].astype(np.float32).reshape(-1, 6),
        "scores": all_scores[keep].astype(np.float32),
    }
    for k, vals in extras.items():
        out[k] = [vals[i] for i in keep]
    return out
