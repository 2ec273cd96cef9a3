"""Preprocessing a Volume into the views the encoder sees: torchio's resampling (ITK anti-aliasing
and linear interpolation), called directly on one shared ITK image per series.

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
import SimpleITK as sitk
from torchio.data.io import get_sitk_metadata_from_ras_affine
from scipy import ndimage

from .enums import VIEW_KINDS
from .errors import ViewError, one_line  # noqa: F401 (re-exported: raised here, caught by prepare)
from .features import View
from .geometry import Volume, spacing, world_bounds
from .mapping import inside_fov

MIN_SMOOTH_VOXELS = 4  # ITK's recursive Gaussian refuses axes shorter than this
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
NO_SMOOTHING_MM = 1e-6  # torchio asks ITK for sigma 1e-9 on axes it does not downsample


class _Native:
    """The series' voxels rescaled to [0, 1] between the clip percentiles, the z-score statistics,
    and the ITK images resampling reads from: built once per series and shared by its views,
    so the global and tiles views convert and anti-alias the native grid once when they can."""

    def __init__(self, volume: Volume, intensity: dict[str, Any]) -> None:
        self.affine = np.asarray(volume.affine, dtype=np.float64)
        lo, hi = intensity.get("clip_percentiles", [0.5, 99.5])
        self.data = _rescaled(volume.data, (lo, hi))
        tensor = torch.from_numpy(self.data)
        self.mean, self.std = 0.0, 1.0
        if intensity.get("normalize", "zscore") == "zscore":
            mean, std = float(tensor.mean()), float(tensor.std())
            self.mean, self.std = mean, std if std > 0 else 1.0
        self.pad = float(tensor.min())  # the resampler's default value (0) is the rescaled minimum
        self._images: dict[Any, sitk.Image] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    def image(self, sigmas: tuple[float, ...] | None = None, short: tuple[float, ...] | None = None) -> sitk.Image:
        """The native grid as an ITK image: as it is, smoothed by ITK's recursive Gaussian
        (``sigmas`` in mm), or smoothed on its long axes only (``short``: voxel sigmas)."""
        key = ("itk", sigmas) if sigmas is not None else ("short", short)
        if key not in self._images:
            if short is not None:
                data = ndimage.gaussian_filter(self.data, np.asarray(short), mode="nearest")
                self._images[key] = _to_itk(data, self.affine)
            elif sigmas is not None:
                self._images[key] = _smooth(self.image(), sigmas)
            else:
                self._images[key] = _to_itk(self.data, self.affine)
        return self._images[key]


def _rescaled(source: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """torchio's RescaleIntensity to [0, 1]: the same operations in the same order (in place on
    a float32 copy, so the same float32 values); an image that is constant once clipped is left
    as it is, as torchio leaves it."""
    array = np.array(source, dtype=np.float32, order="C")
    cutoff = np.percentile(array, percentiles)
    np.clip(array, *cutoff, out=array)
    in_min, in_max = array.min(), array.max()
    in_range = in_max - in_min
    if in_range == 0:
        return np.array(source, dtype=np.float32, order="C")
    array -= in_min
    array /= in_range
    array *= 1.0
    array += 0.0
    return array


def _normalised(volume: Volume, intensity: dict[str, Any]) -> _Native:
    return _Native(volume, intensity)


def _to_itk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """An (I, J, K) array and its RAS affine as an LPS ITK image (torchio's conversion)."""
    image = sitk.GetImageFromArray(data.transpose())
    origin, spacing_, direction = get_sitk_metadata_from_ras_affine(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing_)
    image.SetDirection(direction)
    return image


def _smooth(image: sitk.Image, sigmas: tuple[float, ...]) -> sitk.Image:
    """ITK's recursive Gaussian (SmoothingRecursiveGaussianImageFilter's zero-order passes), one
    axis at a time, skipping axes whose sigma is torchio's "no smoothing" placeholder: such a pass
    leaves the values as they are and costs as much as a real one."""
    out = image
    for axis, sigma in enumerate(sigmas):
        if sigma < NO_SMOOTHING_MM:
            continue
        gaussian = sitk.RecursiveGaussianImageFilter()
        gaussian.SetSigma(float(sigma))
        gaussian.SetDirection(axis)
        gaussian.SetOrder(0)
        gaussian.SetNormalizeAcrossScale(False)
        out = gaussian.Execute(out)
    return out


def _describe(intensity: dict[str, Any], native: _Native) -> dict[str, Any]:
    """The intensity transform as heads see it; padding takes the rescaled minimum (torchio's
    default pad value), i.e. the clipped background, after the same standardisation."""
    lo, hi = intensity.get("clip_percentiles", [0.5, 99.5])
    return {
        "clip_percentiles": (float(lo), float(hi)),
        "normalize": intensity.get("normalize", "zscore"),
        "padding_value": (native.pad - native.mean) / native.std,
    }


def _valid(volume: Volume, shape: np.ndarray, affine: np.ndarray) -> torch.Tensor:
    """(1, X, Y, Z) bool: view voxels whose centre lies inside the series' field of view."""
    inside = inside_fov(tuple(int(n) for n in shape), affine, volume.shape, volume.affine)
    return torch.from_numpy(inside)[None]


def _ras_grid(volume: Volume, spacing: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Affine of an axis-aligned RAS grid of ``shape`` centred on the series' field of view."""
    bounds = world_bounds(volume.shape, volume.affine)
    centre = (bounds[:3] + bounds[3:]) / 2.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - spacing * (shape - 1) / 2.0
    return affine


def _short_sigmas(native: _Native, target_spacing: np.ndarray) -> tuple[float, ...]:
    """Anti-aliasing for grids with an axis shorter than MIN_SMOOTH_VOXELS: the same Gaussian as
    torchio's (Cardoso et al. 2015, sigma from the downsampling factor) on the long axes only,
    in voxels, for scipy (ITK's recursive Gaussian refuses such axes)."""
    factor = np.asarray(target_spacing, dtype=np.float64) / np.asarray(spacing(native.affine))
    sigma_vox = np.sqrt(np.clip(factor**2 - 1.0, 0.0, None)) / FWHM_PER_SIGMA
    sigma_vox[np.asarray(native.shape) < MIN_SMOOTH_VOXELS] = 0.0
    return tuple(float(s) for s in sigma_vox)


def _itk_sigmas(native: _Native, target_spacing: np.ndarray) -> tuple[float, ...]:
    """torchio's anti-aliasing sigmas (mm, ITK axis order): none (1e-9) where not downsampling."""
    source = np.asarray(native.image().GetSpacing(), dtype=np.float64)
    factor = np.asarray(target_spacing, dtype=np.float64) / source
    factor[factor <= 1] = np.nan
    sigma = source * np.sqrt((factor**2 - 1) * FWHM_PER_SIGMA ** (-2))
    sigma[np.isnan(sigma)] = 1e-9
    return tuple(float(s) for s in sigma)


def _resample(native: _Native, shape: np.ndarray, affine: np.ndarray) -> torch.Tensor:
    """Linear resampling of the (anti-aliased) native grid onto the view grid, z-scored."""
    origin, target_spacing, direction = get_sitk_metadata_from_ras_affine(affine)
    if min(native.shape) < MIN_SMOOTH_VOXELS:
        # the view grid is axis-aligned, so its spacing is the diagonal; compare per native axis
        # by the largest target spacing, as torchio does for the isotropic views used here
        image = native.image(short=_short_sigmas(native, np.full(3, float(np.max(np.abs(np.diag(affine)[:3]))))))
    else:
        image = native.image(sigmas=_itk_sigmas(native, np.asarray(target_spacing)))
    resampler = sitk.ResampleImageFilter()
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputDirection(direction)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputSpacing(target_spacing)
    resampler.SetSize(tuple(int(s) for s in shape))
    resampled = resampler.Execute(image)  # the array view below lives only as long as this image
    out = torch.from_numpy(np.ascontiguousarray(sitk.GetArrayViewFromImage(resampled).transpose()))
    return out.sub_(native.mean).div_(native.std)[None]


def _extent(volume: Volume) -> np.ndarray:
    bounds = world_bounds(volume.shape, volume.affine)
    return bounds[3:] - bounds[:3]


def global_view(volume: Volume, preprocessing: dict[str, Any], _norm=None) -> View:
    """The whole field of view fitted into the encoder input."""
    size = np.asarray(preprocessing["input_size"], dtype=int)
    target = float(np.max(preprocessing["spacing"]))
    # one isotropic spacing keeps anatomy's aspect ratio; coarser only when the FOV needs it
    spacing = np.full(3, max(target, float(np.max(_extent(volume) / size))))
    affine = _ras_grid(volume, spacing, size)
    intensity = preprocessing.get("intensity", {})
    native = _norm or _normalised(volume, intensity)
    return View(
        "global",
        _resample(native, size, affine),
        affine,
        [],
        _valid(volume, size, affine),
        _describe(intensity, native),
    )


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
    native = _norm or _normalised(volume, intensity)
    overlap = float(preprocessing.get("tile_overlap", 0.25))
    starts = [window_starts(int(n), int(w), overlap) for n, w in zip(shape, size)]
    windows = [
        (slice(a, a + size[0]), slice(b, b + size[1]), slice(c, c + size[2]))
        for a in starts[0]
        for b in starts[1]
        for c in starts[2]
    ]
    return View(
        "tiles",
        _resample(native, shape, affine),
        affine,
        windows,
        _valid(volume, shape, affine),
        _describe(intensity, native),
    )


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
    return one_line(exc, named=True, limit=200, fold=True, message=text)
