"""Preprocessing a Volume into the views the encoder sees, with torchio.

Every view carries the affine of its own grid, so the engine can map head outputs back to the
series' native grid and to world coordinates.

- ``global``: canonical (RAS) orientation, resampled isotropically so that the whole field of
  view fits the encoder input (never finer than the model's spacing), centred and padded.
- ``tiles``: canonical orientation at the model's spacing, padded to at least one encoder input,
  covered by overlapping encoder-sized windows (sliding window).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchio as tio

from .features import View
from .geometry import Volume

VIEW_KINDS = ("global", "tiles")


def _subject(volume: Volume) -> tio.ScalarImage:
    data = torch.from_numpy(np.ascontiguousarray(volume.data, dtype=np.float32))[None]
    return tio.ScalarImage(tensor=data, affine=volume.affine)


def _normalise(image: tio.ScalarImage, intensity: dict[str, Any]) -> tio.ScalarImage:
    lo, hi = intensity.get("clip_percentiles", [0.5, 99.5])
    image = tio.RescaleIntensity(out_min_max=(0.0, 1.0), percentiles=(lo, hi))(image)
    if intensity.get("normalize", "zscore") == "zscore":
        data = image.data
        std = data.std()
        image = tio.ScalarImage(tensor=(data - data.mean()) / (std if std > 0 else 1.0), affine=image.affine)
    return image


def _to_view(kind: str, image: tio.ScalarImage, windows=None) -> View:
    return View(kind=kind, image=image.data.float().contiguous(), affine=np.asarray(image.affine, dtype=np.float64), windows=windows or [])


def global_view(volume: Volume, preprocessing: dict[str, Any]) -> View:
    """The whole field of view fitted into the encoder input.

    Both views normalise intensities before padding (with the background value), so padding
    never shifts the statistics and a tile of the ``tiles`` view matches the ``global`` view
    wherever the series fits one encoder input.
    """
    size = np.asarray(preprocessing["input_size"], dtype=int)
    target = np.asarray(preprocessing["spacing"], dtype=np.float64)
    image = tio.ToCanonical()(_subject(volume))
    fov = np.asarray(image.spatial_shape) * np.asarray(image.spacing)
    # one scale factor for all axes keeps anatomy's aspect ratio
    scale = max(1.0, float(np.max(fov / (size * target))))
    image = tio.Resample(tuple(target * scale), image_interpolation="linear")(image)
    image = _normalise(image, preprocessing.get("intensity", {}))
    image = tio.CropOrPad(tuple(int(s) for s in size), padding_mode=float(image.data.min()))(image)
    return _to_view("global", image)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window starts covering ``length`` with at least ``overlap`` fractional overlap."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    n = math.ceil((length - window) / step) + 1
    return [int(round(i * (length - window) / (n - 1))) for i in range(n)]


def tiles_view(volume: Volume, preprocessing: dict[str, Any]) -> View:
    """The series at the model's spacing, covered by overlapping encoder-sized windows."""
    size = [int(s) for s in preprocessing["input_size"]]
    image = tio.ToCanonical()(_subject(volume))
    image = tio.Resample(tuple(float(s) for s in preprocessing["spacing"]), image_interpolation="linear")(image)
    image = _normalise(image, preprocessing.get("intensity", {}))
    target = tuple(max(a, b) for a, b in zip(image.spatial_shape, size))
    if target != tuple(image.spatial_shape):
        background = float(image.data.min())
        image = tio.CropOrPad(target, padding_mode=background)(image)
    overlap = float(preprocessing.get("tile_overlap", 0.25))
    starts = [window_starts(n, w, overlap) for n, w in zip(image.spatial_shape, size)]
    windows = [
        (slice(a, a + size[0]), slice(b, b + size[1]), slice(c, c + size[2]))
        for a in starts[0]
        for b in starts[1]
        for c in starts[2]
    ]
    return _to_view("tiles", image, windows)


def make_views(volume: Volume, preprocessing: dict[str, Any], kinds: tuple[str, ...] = VIEW_KINDS) -> dict[str, View]:
    """Compute each requested view once."""
    builders = {"global": global_view, "tiles": tiles_view}
    unknown = set(kinds) - set(builders)
    if unknown:
        raise ValueError(f"unknown view kinds {sorted(unknown)}; known: {sorted(builders)}")
    return {kind: builders[kind](volume, preprocessing) for kind in kinds}
