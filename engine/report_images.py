"""Slice montages for the HTML report: three orthogonal slices of a series, each mask overlaid
in its label colours, boxes drawn with their labels and scores, written as small PNGs.

Pillow, not matplotlib: drawing a grey slice, a colour overlay and a few rectangles needs no
plotting library, Pillow is already installed with highdicom, and a montage costs milliseconds
instead of a figure's set-up. Slices are shown on the closest RAS grid (no resampling of the
voxels, only axis flips and swaps), radiological convention: the patient's right on the left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PANEL = 168  # panel height in pixels: 1,000 series x a few montages stay well under 100 MB
MAX_WIDTH = 260  # a very wide panel (a long sagittal) is scaled down to this width
OVERLAY_ALPHA = 0.45
VIEWS = ("axial", "coronal", "sagittal")


@dataclass
class Box:
    """A box in native voxel indices (i0, j0, k0, i1, j1, k1) with its caption and colour."""

    voxel: np.ndarray
    caption: str
    color: tuple[int, int, int]
    score: float


def canonical(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(orientation, spacing): nibabel's io_orientation of ``affine`` (for each native axis, the
    RAS axis it is closest to and its sign) and the voxel size along each RAS axis."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    spacing = np.ones(3)
    for axis, (target, _) in enumerate(ornt):
        spacing[int(target)] = sizes[axis]
    return ornt, spacing


def to_ras(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """``array`` (native grid) with its axes flipped and swapped onto the closest RAS axes."""
    from nibabel.orientations import apply_orientation

    return apply_orientation(np.asarray(array), ornt)


def box_to_ras(voxel: np.ndarray, ornt: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A native voxel box (i0, j0, k0, i1, j1, k1) as (lo, hi) corners on the RAS-ordered grid."""
    lo, hi = np.zeros(3), np.zeros(3)
    for axis, (target, flip) in enumerate(ornt):
        a, b = float(voxel[axis]), float(voxel[axis + 3])
        if flip < 0:
            a, b = shape[axis] - 1 - a, shape[axis] - 1 - b
        lo[int(target)], hi[int(target)] = min(a, b), max(a, b)
    return np.stack([lo, hi])


def focus(
    shape: tuple[int, ...], masks: list[tuple[np.ndarray, list[str]]], boxes: list[np.ndarray]
) -> tuple[int, int, int]:
    """Where the three slices cross (RAS grid indices): the best box's centre, else the centre of
    the least frequent foreground label of the first mask that has one (a lesion rather than the
    body), else the grid's centre."""
    if boxes:
        centre = boxes[0].mean(axis=0)
        return tuple(int(np.clip(round(c), 0, s - 1)) for c, s in zip(centre, shape))  # type: ignore[return-value]
    for mask, _ in masks:
        counts = np.bincount(mask.ravel(), minlength=2)
        counts[0] = 0
        present = np.flatnonzero(counts)
        if present.size:
            label = present[np.argmin(counts[present])]
            idx = np.argwhere(mask == label)
            centre = idx.mean(axis=0)
            # the voxel of that label nearest its centre, so a ring-shaped label is still cut through
            near = idx[np.argmin(((idx - centre) ** 2).sum(axis=1))]
            return tuple(int(v) for v in near)  # type: ignore[return-value]
    return tuple(s // 2 for s in shape)  # type: ignore[return-value]


def window(image: np.ndarray) -> np.ndarray:
    """uint8 grey levels from the 1st to the 99.5th percentile of the finite voxels."""
    img = np.asarray(image, dtype=np.float32)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.zeros(img.shape, dtype=np.uint8)
    sample = finite[:: max(1, finite.size // 200_000)]
    lo, hi = np.percentile(sample, [1.0, 99.5])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((np.nan_to_num(img, nan=lo) - lo) * scale, 0, 255).astype(np.uint8)


def _slice(volume: np.ndarray, view: str, at: tuple[int, int, int]) -> np.ndarray:
    """The 2D slice as displayed: rows top to bottom, columns left to right."""
    x, y, z = at
    if view == "axial":  # anterior up, patient's right on the left
        return volume[::-1, ::-1, z].T
    if view == "coronal":  # superior up, patient's right on the left
        return volume[::-1, y, ::-1].T
    return volume[x, ::-1, ::-1].T  # sagittal: superior up, anterior on the left


def _rect(view: str, box: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float, float, float] | None:
    """A RAS-grid box as (col0, row0, col1, row1) on the displayed slice, or None."""
    (x0, y0, z0), (x1, y1, z1) = box
    X, Y, Z = shape
    if view == "axial":
        return (X - 1 - x1, Y - 1 - y1, X - 1 - x0, Y - 1 - y0)
    if view == "coronal":
        return (X - 1 - x1, Z - 1 - z1, X - 1 - x0, Z - 1 - z0)
    return (Y - 1 - y1, Z - 1 - z1, Y - 1 - y0, Z - 1 - z0)


def _cuts(view: str, box: np.ndarray, at: tuple[int, int, int]) -> bool:
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}[view]
    return bool(box[0][axis] - 0.5 <= at[axis] <= box[1][axis] + 0.5)


def _panel_size(view: str, shape: tuple[int, ...], spacing: np.ndarray) -> tuple[int, int]:
    cols, rows = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[view]
    w_mm, h_mm = shape[cols] * spacing[cols], shape[rows] * spacing[rows]
    scale = PANEL / max(h_mm, 1e-6)
    w = min(MAX_WIDTH, max(16, round(w_mm * scale)))
    return w, max(16, round(h_mm * min(scale, w / max(w_mm, 1e-6))))


def montage(
    image: np.ndarray | None,
    affine: np.ndarray,
    shape: tuple[int, ...],
    masks: list[tuple[np.ndarray, list[tuple[int, int, int]]]],
    boxes: list[Box],
) -> Any:
    """A Pillow RGB image: axial, coronal and sagittal slices side by side, through the best box
    or the smallest labelled structure. ``image`` may be None (its source could not be read):
    the masks are then drawn on black. ``masks`` are (label mask, RGB colour per label)."""
    from PIL import Image, ImageDraw

    ornt, spacing = canonical(affine, shape)
    grid = tuple(int(s) for s in to_ras(np.empty(shape, dtype=bool), ornt).shape)
    grey = window(to_ras(image, ornt)) if image is not None else np.zeros(grid, dtype=np.uint8)
    ras_masks = [(to_ras(m, ornt), colors) for m, colors in masks]
    ras_boxes = [box_to_ras(b.voxel, ornt, shape) for b in boxes]
    at = focus(grid, [(m, []) for m, _ in ras_masks], ras_boxes)
    panels = []
    for view in VIEWS:
        rgb = np.repeat(_slice(grey, view, at)[..., None], 3, axis=2).astype(np.float32)
        for mask, colors in ras_masks:
            labels = _slice(mask, view, at)
            lut = np.zeros((max(256, len(colors)), 3), dtype=np.float32)
            lut[: len(colors)] = np.asarray(colors, dtype=np.float32).reshape(-1, 3)
            on = labels > 0
            rgb[on] = rgb[on] * (1 - OVERLAY_ALPHA) + lut[labels[on]] * OVERLAY_ALPHA
        h, w = rgb.shape[:2]
        size = _panel_size(view, grid, spacing)
        panel = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(panel)
        sx, sy = size[0] / w, size[1] / h
        for box, ras in zip(boxes, ras_boxes):
            if not _cuts(view, ras, at):
                continue
            c0, r0, c1, r1 = _rect(view, ras, grid)
            xy = (c0 * sx, r0 * sy, (c1 + 1) * sx, (r1 + 1) * sy)
            draw.rectangle(xy, outline=box.color, width=2)
            draw.text((xy[0] + 2, max(0, xy[1] - 11)), box.caption, fill=box.color)
        draw.text((3, 2), view[0].upper(), fill=(255, 255, 0))
        panels.append(panel)
    height = max(p.height for p in panels)
    out = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), height))
    x = 0
    for p in panels:
        out.paste(p, (x, (height - p.height) // 2))
        x += p.width + 4
    return out


def save_png(img: Any, path: Any) -> None:
    """A palette PNG (256 colours): a third of the RGB file's size, no visible loss on a montage."""
    img.quantize(colors=256, method=2).save(path, format="PNG", optimize=False)


def hex_rgb(color: Any, fallback: tuple[int, int, int] = (255, 64, 64)) -> tuple[int, int, int]:
    """'#rrggbb' or [r, g, b] (0-255 or 0-1) as an RGB tuple; anything else: ``fallback``."""
    try:
        if isinstance(color, str) and color.startswith("#") and len(color) == 7:
            return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        vals = [float(v) for v in color][:3]
        if len(vals) == 3:
            scale = 255.0 if max(vals) <= 1.0 else 1.0
            return tuple(int(round(min(255.0, max(0.0, v * scale)))) for v in vals)  # type: ignore[return-value]
    except (TypeError, ValueError):
        pass
    return fallback
