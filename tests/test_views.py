"""The views against torchio's own transforms as the independent reference: the same voxels
(within float tolerance), the same affines, on axial, sagittal, coronal, oblique, flipped and
few-slice series."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from engine.geometry import Volume
from engine.views import FWHM_PER_SIGMA, MIN_SMOOTH_VOXELS, _ras_grid, make_views

PRE = {
    "spacing": [3.0, 3.0, 3.0],
    "input_size": [32, 32, 32],
    "tile_overlap": 0.25,
    "intensity": {"clip_percentiles": [0.5, 99.5], "normalize": "zscore"},
}


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(rotation: np.ndarray, zooms: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms)
    affine[:3, 3] = [-60.0, 40.0, -20.0]
    return affine


AXIAL = np.diag([-1.0, -1.0, 1.0])
SAGITTAL = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)
CORONAL = np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)
CASES = {
    "axial": (AXIAL, (1.1, 1.1, 4.0), (90, 100, 30)),
    "sagittal": (SAGITTAL, (1.3, 1.3, 3.5), (80, 96, 28)),
    "coronal": (CORONAL, (0.9, 0.9, 5.0), (120, 110, 20)),
    "oblique": (_rotation(0, 23) @ _rotation(2, -17), (1.6, 1.4, 3.0), (70, 80, 40)),
    "flipped": (np.diag([1.0, -1.0, -1.0]), (2.0, 2.0, 2.0), (60, 64, 50)),
    "few slices": (AXIAL, (1.0, 1.0, 6.0), (100, 90, 2)),
}


def _volume(shape: tuple[int, int, int], affine: np.ndarray) -> Volume:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    data = 900.0 * np.exp(-3.0 * (grid**2).sum(0)) + rng.normal(0, 20, shape)
    return Volume(data=data.astype(np.float32), affine=affine, meta={})


def _torchio_view(volume: Volume, affine: np.ndarray, shape: np.ndarray) -> torch.Tensor:
    """The view as torchio computes it: RescaleIntensity, then Resample (anti-aliased) to the grid."""
    image = tio.ScalarImage(tensor=torch.from_numpy(volume.data.copy())[None], affine=volume.affine)
    image = tio.RescaleIntensity(out_min_max=(0.0, 1.0), percentiles=(0.5, 99.5))(image)
    mean, std = float(image.data.mean()), float(image.data.std()) or 1.0
    short = min(image.spatial_shape) < MIN_SMOOTH_VOXELS
    if short:
        from scipy import ndimage

        native = np.linalg.norm(volume.affine[:3, :3], axis=0)
        factor = np.full(3, float(np.max(np.abs(np.diag(affine)[:3])))) / native
        sigma = np.sqrt(np.clip(factor**2 - 1.0, 0.0, None)) / FWHM_PER_SIGMA
        sigma[np.asarray(image.spatial_shape) < MIN_SMOOTH_VOXELS] = 0.0
        smoothed = ndimage.gaussian_filter(image.data[0].numpy(), sigma, mode="nearest")
        image = tio.ScalarImage(tensor=torch.from_numpy(smoothed)[None], affine=image.affine)
    out = tio.Resample((tuple(int(n) for n in shape), affine), image_interpolation="linear", antialias=not short)(image)
    return (out.data.float() - mean) / std


@pytest.mark.parametrize("name", list(CASES))
def test_views_match_torchio(name):
    rotation, zooms, shape = CASES[name]
    volume = _volume(shape, _affine(rotation, zooms))
    views = make_views(volume, PRE)
    for kind, view in views.items():
        expected = _torchio_view(volume, view.affine, np.asarray(view.shape))
        assert view.image.shape == expected.shape and view.image.dtype == torch.float32
        np.testing.assert_allclose(view.image.numpy(), expected.numpy(), atol=1e-4, rtol=0)
        assert view.valid is not None and view.valid.dtype == torch.bool and view.valid.shape == view.image.shape
    g = views["global"]
    spacing = g.affine[0, 0]
    np.testing.assert_allclose(g.affine, _ras_grid(volume, np.full(3, spacing), np.asarray(g.shape)), atol=1e-9)


def test_constant_series_is_left_as_it_is():
    volume = Volume(data=np.full((40, 40, 20), 7.0, np.float32), affine=_affine(AXIAL, (2.0, 2.0, 3.0)), meta={})
    view = make_views(volume, PRE, ("global",))["global"]
    expected = _torchio_view(volume, view.affine, np.asarray(view.shape))
    np.testing.assert_allclose(view.image.numpy(), expected.numpy(), atol=1e-4)
