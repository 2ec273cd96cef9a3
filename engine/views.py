"""Preprocessing a Volume into the views the encoder sees, with torchio.

Views are axis-aligned RAS grids, whatever the acquisition: the same anatomy reaches the encoder
in the same orientation from axial, sagittal, coronal, oblique or flipped series. Every view
carries its own affine, so the engine can map head outputs back to the native grid.

- ``global``: the series' whole field of view fitted into one encoder input, isotropic, never
  finer than the model's spacing, centred.
- ``tiles``: the series at the model's spacing, at least one encoder input in size, covered by
  overlapping encoder-sized windows (sliding window).

Intensities are clipped to percentiles and rescaled to [0, 1] on the native voxels (so padding
is background, 0), then z-scored with the native voxels' statistics: both views of a series get
the same intensity mapping and padding never shifts it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchio as tio

from .features import View
from .geometry import Volume
from .mapping import grid_world_bounds

VIEW_KINDS = ("global", "tiles")


def _normalised(volume: Volume, intensity: dict[str, Any]) -> tuple[tio.ScalarImage, float, float]:
    """The volume rescaled to [0, 1] between its clip percentiles, and the z-score statistics."""
    data = torch.from_numpy(np.ascontiguousarray(volume.data, dtype=np.float32))[None]
    lo, hi = intensity.get("clip_percentiles", [0.5, 99.5])
    image = tio.RescaleIntensity(out_min_max=(0.0, 1.0), percentiles=(lo, hi))(tio.ScalarImage(tensor=data, affine=volume.affine))
    if intensity.get("normalize", "zscore") == "zscore":
        mean, std = float(image.data.mean()), float(image.data.std())
        return image, mean, std if std > 0 else 1.0
    return image, 0.0, 1.0


def _ras_grid(volume: Volume, spacing: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Affine of an axis-aligned RAS grid of ``shape`` centred on the series' field of view."""
    bounds = grid_world_bounds(volume.shape, volume.affine)
    centre = (bounds[:3] + bounds[3:]) / 2.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - spacing * (shape - 1) / 2.0
    return affine


def _resample(image: tio.ScalarImage, shape: np.ndarray, affine: np.ndarray, mean: float, std: float) -> torch.Tensor:
    target = (tuple(int(s) for s in shape), affine)
    out = tio.Resample(target, image_interpolation="linear", antialias=True)(image)
    return ((out.data.float() - mean) / std).contiguous()


def _extent(volume: Volume) -> np.ndarray:
    bounds = grid_world_bounds(volume.shape, volume.affine)
    return bounds[3:] - bounds[:3]


def global_view(volume: Volume, preprocessing: dict[str, Any], _norm=None) -> View:
    """The whole field of view fitted into the encoder input."""
    size = np.asarray(preprocessing["input_size"], dtype=int)
    target = float(np.max(preprocessing["spacing"]))
    # one isotropic spacing keeps anatomy's aspect ratio; coarser only when the FOV needs it
    spacing = np.full(3, max(target, float(np.max(_extent(volume) / size))))
    affine = _ras_grid(volume, spacing, size)
    image, mean, std = _norm or _normalised(volume, preprocessing.get("intensity", {}))
    return View("global", _resample(image, size, affine, mean, std), affine)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window starts covering ``length`` with at least ``overlap`` fractional overlap."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    n = math.ceil((length - window) / step) + 1
    return [int(round(i * (length - window) / (n - 1))) for i in range(n)]


def tiles_view(volume: Volume, preprocessing: dict[str, Any], _norm=None) -> View:
    """The series at the model's spacing, covered by overlapping encoder-sized windows."""
    size = np.asarray(preprocessing["input_size"], dtype=int)
    spacing = np.asarray(preprocessing["spacing"], dtype=np.float64)
    shape = np.maximum(np.ceil(_extent(volume) / spacing - 1e-6).astype(int), size)
    affine = _ras_grid(volume, spacing, shape)
    image, mean, std = _norm or _normalised(volume, preprocessing.get("intensity", {}))
    overlap = float(preprocessing.get("tile_overlap", 0.25))
    starts = [window_starts(int(n), int(w), overlap) for n, w in zip(shape, size)]
    windows = [
        (slice(a, a + size[0]), slice(b, b + size[1]), slice(c, c + size[2]))
        for a in starts[0]
        for b in starts[1]
        for c in starts[2]
    ]
    return View("tiles", _resample(image, shape, affine, mean, std), affine, windows)


def make_views(volume: Volume, preprocessing: dict[str, Any], kinds: tuple[str, ...] = VIEW_KINDS) -> dict[str, View]:
    """Compute each requested view once (sharing the intensity normalisation)."""
    builders = {"global": global_view, "tiles": tiles_view}
    unknown = set(kinds) - set(builders)
    if unknown:
        raise ValueError(f"unknown view kinds {sorted(unknown)}; known: {sorted(builders)}")
    norm = _normalised(volume, preprocessing.get("intensity", {}))
    return {kind: builders[kind](volume, preprocessing, norm) for kind in kinds}
