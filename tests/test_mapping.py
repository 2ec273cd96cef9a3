"""View-space masks and boxes map back to the native grid and world coordinates."""

import numpy as np
import pytest

from engine.geometry import Volume, apply_affine, voxel_centre_bounds, world_bounds
from engine.mapping import blend_windows, boxes_to_native, inside_fov, mask_to_native
from engine.views import make_views, window_starts

PRE = {
    "orientation": "RAS",
    "spacing": [3.0, 3.0, 3.0],
    "input_size": [64, 64, 64],
    "intensity": {"clip_percentiles": [0.5, 99.5], "normalize": "zscore"},
    "tile_overlap": 0.25,
}
CENTER = np.array([12.0, -20.0, 30.0])
RADII = np.array([35.0, 25.0, 20.0])


def rotation(deg_x: float, deg_y: float) -> np.ndarray:
    ax, ay = np.radians([deg_x, deg_y])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return ry @ rx


# direction cosines (columns = world direction of i, j, k) and voxel sizes
ACQUISITIONS = {
    "axial": (np.array([[-1, 0, 0], [0, -1, 0], [0, 0, 1]]), (1.2, 1.2, 3.0)),
    "sagittal": (np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]]).T, (1.1, 1.1, 3.5)),
    "coronal": (np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]).T, (1.0, 1.0, 4.0)),
    "oblique": (rotation(20, 15) @ np.diag([-1, -1, 1]), (1.3, 1.3, 3.0)),
    "flipped": (np.array([[1, 0, 0], [0, 1, 0], [0, 0, -1]]), (1.5, 1.5, 2.5)),
}


def grid(name: str, shape=(150, 150, 40)) -> tuple[tuple[int, int, int], np.ndarray]:
    dirs, sp = ACQUISITIONS[name]
    affine = np.eye(4)
    affine[:3, :3] = dirs * np.asarray(sp)
    # centre the grid on the structure's centre (plus an offset so it is not symmetric)
    affine[:3, 3] = CENTER + np.array([5.0, -3.0, 2.0]) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return shape, affine


def inside(points: np.ndarray) -> np.ndarray:
    return (((points - CENTER) / RADII) ** 2).sum(axis=1) <= 1.0


def structure_on(shape, affine) -> np.ndarray:
    idx = np.indices(shape).reshape(3, -1).T
    return inside(apply_affine(affine, idx)).reshape(shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_view_mask_maps_back_to_the_structure_on_the_native_grid(name):
    shape, affine = grid(name)
    truth = structure_on(shape, affine)
    volume = Volume(truth.astype(np.float32) * 100 + 10, affine)
    views = make_views(volume, PRE)
    for kind, view in views.items():
        marked = structure_on(view.shape, view.affine)  # what a perfect head marks in view space
        probs = np.stack([~marked, marked]).astype(np.float32)
        native = mask_to_native(probs, view.affine, shape, affine)
        assert native.shape == shape
        assert dice(native.astype(bool), truth) >= 0.95, (name, kind)


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_views_are_axis_aligned_ras_and_cover_the_series(name):
    shape, affine = grid(name)
    views = make_views(Volume(np.random.default_rng(0).random(shape, dtype=np.float32), affine), PRE)
    native_box = voxel_centre_bounds(shape, affine)
    for view in views.values():
        if view.kind == "tiles":
            np.testing.assert_allclose(np.linalg.norm(view.affine[:3, :3], axis=0), 3.0, rtol=1e-6)
        lin = view.affine[:3, :3]
        assert np.allclose(lin, np.diag(np.diag(lin))) and (np.diag(lin) > 0).all(), "views are axis-aligned RAS grids"
        view_box = world_bounds(view.shape, view.affine)
        assert (view_box[:3] <= native_box[:3] + 1e-6).all() and (view_box[3:] >= native_box[3:] - 1e-6).all()
        image = view.image.numpy()
        assert np.isfinite(image).all() and image.std() > 0.5
        assert np.isclose(image.min(), image[0, 0, 0, 0]), "padding takes the background value"


def test_window_starts_cover_with_overlap():
    assert window_starts(64, 64, 0.25) == [0]
    starts = window_starts(150, 64, 0.25)
    assert starts[0] == 0 and starts[-1] == 150 - 64
    assert all(b - a <= 48 for a, b in zip(starts, starts[1:]))


def test_sliding_window_equals_single_pass_when_the_volume_fits_one_tile():
    rng = np.random.default_rng(1)
    probs = rng.random((3, 64, 64, 64)).astype(np.float32)
    blended = blend_windows([probs], [(slice(0, 64),) * 3], (64, 64, 64))
    np.testing.assert_allclose(blended, probs, rtol=1e-6)


def test_sliding_window_has_no_seams():
    # a smooth field predicted tile by tile must blend back to the same smooth field
    shape = (150, 100, 70)
    x, y, z = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    field = np.stack([x * 0.5 + y * 0.3 + z * 0.2, 1 - (x * 0.5 + y * 0.3 + z * 0.2)]).astype(np.float32)
    starts = [window_starts(n, 64, 0.25) for n in shape]
    windows = [
        (slice(a, a + 64), slice(b, b + 64), slice(c, c + 64)) for a in starts[0] for b in starts[1] for c in starts[2]
    ]
    assert len(windows) > 1
    blended = blend_windows([field[(slice(None), *w)] for w in windows], windows, shape)
    np.testing.assert_allclose(blended, field, atol=1e-5)
    # with per-tile disagreement (a bias per tile), the blend stays continuous: no jumps at borders
    rng = np.random.default_rng(2)
    biased = [np.clip(field[(slice(None), *w)] + rng.normal(0, 0.05), 0, 1) for w in windows]
    out = blend_windows(biased, windows, shape)
    jumps = np.abs(np.diff(out[0], axis=0)).max()
    assert jumps < 0.05, f"largest step between neighbouring voxels {jumps:.3f}"


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_boxes_map_to_world_and_native_voxels_inside_the_series(name):
    shape, affine = grid(name)
    view = make_views(Volume(structure_on(shape, affine).astype(np.float32), affine), PRE, ("global",))["global"]
    # a view-space box around the structure
    lo = np.floor(apply_affine(np.linalg.inv(view.affine), [CENTER - RADII])[0])
    hi = np.ceil(apply_affine(np.linalg.inv(view.affine), [CENTER + RADII])[0])
    world, voxel, keep = boxes_to_native(np.concatenate([lo, hi])[None], view.affine, shape, affine)
    assert keep.tolist() == [0]
    series = world_bounds(shape, affine)
    assert (world[0, :3] >= series[:3] - 1e-6).all() and (world[0, 3:] <= series[3:] + 1e-6).all()
    # the structure's centre is inside both the world box and (mapped) the voxel box
    assert (world[0, :3] <= CENTER).all() and (CENTER <= world[0, 3:]).all()
    c_vox = apply_affine(np.linalg.inv(affine), [CENTER])[0]
    assert (voxel[0, :3] <= c_vox + 1e-6).all() and (c_vox <= voxel[0, 3:] + 1e-6).all()
    # a box that lies wholly outside the acquired field of view is dropped
    far = view.affine.copy()
    far[:3, 3] += 1000.0
    world, voxel, keep = boxes_to_native(np.concatenate([lo, hi])[None], far, shape, affine)
    assert keep.size == 0 and world.shape == (0, 6) and voxel.shape == (0, 6)


def test_tiles_view_is_the_global_view_when_the_series_fits_one_window():
    shape, affine = grid("oblique", shape=(100, 90, 30))
    views = make_views(Volume(structure_on(shape, affine).astype(np.float32), affine), PRE)
    tiles, single = views["tiles"], views["global"]
    assert tiles.windows == [(slice(0, 64),) * 3]
    np.testing.assert_allclose(tiles.affine, single.affine)
    np.testing.assert_allclose(tiles.image.numpy(), single.image.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_every_native_voxel_inside_the_view_maps_back_edges_included(name):
    shape, affine = grid(name)
    view = make_views(Volume(structure_on(shape, affine).astype(np.float32), affine), PRE, ("global",))["global"]
    ones = np.ones((1, *view.shape), np.float32)
    assert mask_to_native(ones, view.affine, shape, affine, mode="sigmoid").all()
    softmax = np.stack([np.zeros(view.shape), np.ones(view.shape)]).astype(np.float32)
    assert (mask_to_native(softmax, view.affine, shape, affine) == 1).all()


def test_native_voxels_outside_the_view_are_background_and_the_edge_is_half_a_voxel_out():
    view_affine = np.eye(4)  # a 10^3 view: field of view [-0.5, 9.5] mm on every axis
    native_affine = np.diag([0.25, 0.25, 0.25, 1.0])
    native_affine[:3, 3] = -1.0  # native centres from -1.0 to 11.25 mm along each axis
    native_shape = (50, 50, 50)
    inside = inside_fov(native_shape, native_affine, (10, 10, 10), view_affine)
    centres = -1.0 + 0.25 * np.arange(50)
    axis = (centres >= -0.5) & (centres <= 9.5)
    np.testing.assert_array_equal(inside, axis[:, None, None] & axis[None, :, None] & axis[None, None, :])
    mask = mask_to_native(
        np.ones((1, 10, 10, 10), np.float32), view_affine, native_shape, native_affine, mode="sigmoid"
    )
    np.testing.assert_array_equal(mask.astype(bool), inside)
    labels = mask_to_native(
        np.stack([np.zeros((10,) * 3), np.ones((10,) * 3)]).astype(np.float32), view_affine, native_shape, native_affine
    )
    np.testing.assert_array_equal(labels.astype(bool), inside)


def test_boxes_use_continuous_coordinates_with_voxel_centres_at_integers():
    view_affine = np.diag([2.0, 2.0, 2.0, 1.0])  # view voxel i is centred at 2i mm
    native_affine = np.eye(4)  # native voxel i is centred at i mm
    # view voxels 1..3 along every axis: edges 0.5 and 3.5 -> world 1 mm to 7 mm
    world, voxel, keep = boxes_to_native(
        np.array([[0.5, 0.5, 0.5, 3.5, 3.5, 3.5]]), view_affine, (20, 20, 20), native_affine
    )
    np.testing.assert_allclose(world[0], [1, 1, 1, 7, 7, 7])
    np.testing.assert_allclose(voxel[0], [1, 1, 1, 7, 7, 7])
    # the whole view clips to the native field of view, [-0.5, n - 0.5] in native voxels
    _, voxel, _ = boxes_to_native(
        np.array([[-0.5, -0.5, -0.5, 19.5, 19.5, 19.5]]), view_affine, (20, 20, 20), native_affine
    )
    np.testing.assert_allclose(voxel[0], [-0.5, -0.5, -0.5, 19.5, 19.5, 19.5])
