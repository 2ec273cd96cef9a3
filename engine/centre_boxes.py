"""Boxes from a dense centre map (CenterNet-style), in a view window's continuous voxel coordinates.

A detector predicts, per output cell of stride ``s``, a centre probability, a box size (voxels,
per axis) and the centre's offset inside the cell (0..1). Cell ``c`` covers voxels
``c*s .. c*s + s - 1``, i.e. the continuous span ``[c*s - 0.5, (c+1)*s - 0.5]``, so a centre at
continuous coordinate ``x`` lies in cell ``floor((x + 0.5) / s)`` at offset ``(x + 0.5) / s - c``.
Peaks are cells that are the maximum of their 3x3x3 neighbourhood (the detector's own NMS), kept
above a score threshold; 3D NMS then drops overlapping boxes. :func:`centre_targets` is the
inverse, used to train the maps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .token_boxes import nms3d

__all__ = ["centre_boxes", "centre_targets", "peak_cells"]


def peak_cells(prob: torch.Tensor, threshold: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local maxima of a centre map (X, Y, Z) at or above ``threshold``: (P, 3) cells and (P,)
    scores, the ``k`` highest first."""
    pooled = F.max_pool3d(prob[None, None], 3, stride=1, padding=1)[0, 0]
    flat = torch.where((prob == pooled) & (prob >= threshold), prob, torch.zeros_like(prob)).flatten()
    scores, idx = flat.topk(min(k, flat.numel()))
    keep = scores >= threshold
    scores, idx = scores[keep & (scores > 0)], idx[keep & (scores > 0)]
    cells = torch.stack(torch.unravel_index(idx, prob.shape), dim=1)
    return cells, scores


def centre_boxes(
    prob: torch.Tensor,
    log_size: torch.Tensor,
    offset: torch.Tensor,
    stride: int,
    threshold: float,
    max_boxes: int,
    iou: float = 0.3,
    image_shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 6) in window voxel edges and their scores (N,), highest first.

    prob (X, Y, Z) centre probabilities; log_size (3, X, Y, Z) log box edge lengths in voxels;
    offset (3, X, Y, Z) in [0, 1]; ``stride`` voxels per cell. With ``image_shape`` boxes are
    clipped to the window (a head's boxes must lie inside the image it saw).
    """
    cells, scores = peak_cells(prob, threshold, 4 * max_boxes)
    if len(cells) == 0:
        return np.zeros((0, 6), np.float32), np.zeros(0, np.float32)
    at = (slice(None), cells[:, 0], cells[:, 1], cells[:, 2])
    centre = (cells.double() + offset[at].T.double()) * stride - 0.5
    half = log_size[at].T.double().exp() / 2
    boxes = torch.cat([centre - half, centre + half], dim=1).numpy()
    if image_shape is not None:
        hi = np.asarray(image_shape[-3:], np.float64) - 0.5
        boxes = np.concatenate([np.clip(boxes[:, :3], -0.5, hi), np.clip(boxes[:, 3:], -0.5, hi)], axis=1)
    s = scores.double().numpy()
    keep = nms3d(boxes, s, iou)[:max_boxes]
    return boxes[keep].astype(np.float32), s[keep].astype(np.float32)


def centre_targets(
    boxes: np.ndarray, grid: tuple[int, int, int], stride: int, min_sigma: float = 0.6
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training targets for boxes (M, 6) in window voxel edges on an output grid of ``grid`` cells.

    Returns heat (X, Y, Z) Gaussian bumps peaking at 1 on each centre cell (sigma per axis a
    sixth of the box's extent in cells, at least ``min_sigma``), log sizes (3, X, Y, Z),
    offsets (3, X, Y, Z) and a (X, Y, Z) mask of the centre cells where size and offset are
    supervised. Boxes whose centre falls outside the grid add no centre (their bumps still do).
    """
    heat = np.zeros(grid, np.float32)
    size = np.zeros((3, *grid), np.float32)
    off = np.zeros((3, *grid), np.float32)
    mask = np.zeros(grid, bool)
    axes = [np.arange(n, dtype=np.float32) for n in grid]
    for box in np.asarray(boxes, np.float64).reshape(-1, 6):
        ctr = (box[:3] + box[3:]) / 2
        pos = (ctr + 0.5) / stride
        cell = np.floor(pos).astype(int)
        ext = np.maximum(box[3:] - box[:3], 1.0)
        sigma = np.maximum(ext / stride / 6, min_sigma)
        g = [np.exp(-0.5 * ((a + 0.5 - p) / sg) ** 2) for a, p, sg in zip(axes, pos, sigma)]
        bump = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        inside = bool(((cell >= 0) & (cell < np.asarray(grid))).all())
        bump = np.minimum(bump / bump.max(), 0.99)  # only the centre cell is exactly 1, even on a cell edge
        if inside:
            bump[tuple(cell)] = 1.0
        np.maximum(heat, bump, out=heat)
        if inside:
            c = tuple(cell)
            mask[c] = True
            size[(slice(None), *c)] = np.log(ext)
            off[(slice(None), *c)] = pos - cell
    return heat, size, off, mask
