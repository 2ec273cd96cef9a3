"""Preprocessing a Volume into the views the encoder sees, with torchio.

Views are axis-aligned RAS grids, whatever the acquisition: the same anatomy reaches the encoder
in the same orientation from axial, sagittal, coronal, oblique or flipped series. Every view
carries its own affine, so the engine can map head outputs back to the native grid.

- ``global``: the series' whole field of view fitted into one encoder input, isotropic, never
  finer than the model's spacing, centred.
- ``tiles``: the series at the model's spacing, at least one encoder input in size, covered by
  overlapping encoder-sized windows (sliding window).

Series with fewer than four voxels along an axis (single- or few-slice series) are smoothed
before downsampling by :func:`_smooth_short` instead of ITK's recursive Gaussian, which needs
four voxels along every axis; the short axes are not smoothed (there is nothing to average).
Any failure to build a view is a :class:`ViewError` with a plain reason.

Intensities are clipped to percentiles and rescaled to [0, 1] on the native voxels (so padding
is background, 0), then z-scored with the native voxels' statistics: both views of a series get
the same intensity mapping and padding never shifts it. Each view carries ``valid`` (True where a
view voxel's centre lies inside the series' field of view) and ``intensity`` (the transform and
the padding value), which heads receive as ``HeadInput.valid`` and ``HeadInput.view_info``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torchio as tio
from scipy import ndimage

from .errors import InputError
from .features import View
from .geometry import Volume, spacing
from .mapping import grid_world_bounds, inside_fov

VIEW_KINDS = ("global", "tiles")
MIN_SMOOTH_VOXELS = 4  # ITK's recursive Gaussian refuses axes shorter than this
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


class ViewError(InputError):
    """The series could not be resampled into the encoder's views."""


def _normalised(volume: Volume, intensity: dict[str, Any]) -> tuple[tio.ScalarImage, float, float]:
    """The volume rescaled to [0, 1] between its clip percentiles, and the z-score statistics."""
    data = torch.from_numpy(np.ascontiguousarray(volume.data, dtype=np.float32))[None]
    lo, hi = intensity.get("clip_percentiles", [0.5, 99.5])
    image = tio.RescaleIntensity(out_min_max=(0.0, 1.0), percentiles=(lo, hi))(tio.ScalarImage(tensor=data, affine=volume.affine))
    if intensity.get("normalize", "zscore") == "zscore":
        mean, std = float(image.data.mean()), float(image.data.std())
        return image, mean, std if std > 0 else 1.0
    return image, 0.0, 1.0


def _describe(volume: Volume, intensity: dict[str, Any], norm: tuple[tio.ScalarImage, float, float]) -> dict[str, Any]:
    """The intensity transform as heads see it; padding takes the rescaled minimum (torchio's
    default pad value), i.e. the clipped background, after the same standardisation."""
    image, mean, std = norm
    lo, hi = intensity.get("clip_percentiles", [0.5, 99.5])
    pad = float(image.data.min())
    return {"clip_percentiles": (float(lo), float(hi)), "normalize": intensity.get("normalize", "zscore"),
            "padding_value": (pad - mean) / std}


def _valid(volume: Volume, shape: np.ndarray, affine: np.ndarray) -> torch.Tensor:
    """(1, X, Y, Z) bool: view voxels whose centre lies inside the series' field of view."""
    inside = inside_fov(tuple(int(n) for n in shape), affine, volume.shape, volume.affine)
    return torch.from_numpy(inside)[None]


def _ras_grid(volume: Volume, spacing: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Affine of an axis-aligned RAS grid of ``shape`` centred on the series' field of view."""
    bounds = grid_world_bounds(volume.shape, volume.affine)
    centre = (bounds[:3] + bounds[3:]) / 2.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - spacing * (shape - 1) / 2.0
    return affine


def _smooth_short(image: tio.ScalarImage, target_spacing: np.ndarray) -> tio.ScalarImage:
    """Anti-aliasing for grids with an axis shorter than MIN_SMOOTH_VOXELS: the same Gaussian as
    torchio's (Cardoso et al. 2015, sigma from the downsampling factor) on the long axes only."""
    native = np.asarray(spacing(image.affine))
    factor = np.asarray(target_spacing, dtype=np.float64) / native
    sigma_vox = np.sqrt(np.clip(factor**2 - 1.0, 0.0, None)) / FWHM_PER_SIGMA
    sigma_vox[np.asarray(image.spatial_shape) < MIN_SMOOTH_VOXELS] = 0.0
    data = ndimage.gaussian_filter(image.data[0].numpy().astype(np.float32), sigma_vox, mode="nearest")
    return tio.ScalarImage(tensor=torch.from_numpy(data)[None], affine=image.affine)


def _resample(image: tio.ScalarImage, shape: np.ndarray, affine: np.ndarray, mean: float, std: float) -> torch.Tensor:
    target = (tuple(int(s) for s in shape), affine)
    short = min(image.spatial_shape) < MIN_SMOOTH_VOXELS
    if short:
        # the view grid is axis-aligned, so its spacing is the diagonal; compare per native axis
        # by the largest target spacing, as torchio does for the isotropic views used here
        image = _smooth_short(image, np.full(3, float(np.max(np.abs(np.diag(affine)[:3])))))
    out = tio.Resample(target, image_interpolation="linear", antialias=not short)(image)
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
    intensity = preprocessing.get("intensity", {})
    norm = _norm or _normalised(volume, intensity)
    image, mean, std = norm
    return View("global", _resample(image, size, affine, mean, std), affine, [],
                _valid(volume, size, affine), _describe(volume, intensity, norm))


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
    intensity = preprocessing.get("intensity", {})
    norm = _norm or _normalised(volume, intensity)
    image, mean, std = norm
    overlap = float(preprocessing.get("tile_overlap", 0.25))
    starts = [window_starts(int(n), int(w), overlap) for n, w in zip(shape, size)]
    windows = [
        (slice(a, a + size[0]), slice(b, b + size[1]), slice(c, c + size[2]))
        for a in starts[0]
        for b in starts[1]
        for c in starts[2]
    ]
    return View("tiles", _resample(image, shape, affine, mean, std), affine, windows,
                _valid(volume, shape, affine), _describe(volume, intensity, norm))


def make_views(volume: Volume, preprocessing: dict[str, Any], kinds: tuple[str, ...] = VIEW_KINDS) -> dict[str, View]:
    """Compute each requested view once (sharing the intensity normalisation)."""
    builders = {"global": global_view, "tiles": tiles_view}
    unknown = set(kinds) - set(builders)
    if unknown:
        raise ValueError(f"unknown view kinds {sorted(unknown)}; known: {sorted(builders)}")
    try:
        norm = _normalised(volume, preprocessing.get("intensity", {}))
        return {kind: builders[kind](volume, preprocessing, norm) for kind in kinds}
    except ViewError:
        raise
    except Exception as exc:  # ITK/torchio errors carry C++ paths and object addresses
        raise ViewError(f"could not resample the series into the encoder views ({plain_reason(exc)})") from exc


_ITK_NOISE = re.compile(r"^.*?ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", re.S)


def plain_reason(exc: BaseException) -> str:
    """One short line for an exception: the message ITK meant for people, without file paths,
    object addresses or 'Exception thrown in SimpleITK ...' preambles."""
    text = str(exc)
    if "ITK" in text:
        cleaned = _ITK_NOISE.sub("", text)
        text = cleaned if cleaned != text else "the ITK resampler rejected the grid"
    line = " ".join(text.split())[:200]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
