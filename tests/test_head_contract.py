"""The head contract end to end: heads written as a third party would, run through the real
views -> predict -> checks -> mapping path on series of every acquisition orientation.

- an all-foreground one-channel head covers every native voxel (the field-of-view edge included);
- a threshold head on the view agrees with the same threshold on the native grid (Dice);
- a half-field head (world x > 0, from ViewInfo alone) lands on the right side of the patient;
- a broken head fails only itself, on the series concerned, with a reason naming it.

``examples/head_contract_table.py`` prints the same measurements as a table.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import engine
from engine.features import Features
from engine.geometry import Volume, apply_affine
from engine.inference import Inference
from engine.prepare import Prepared
from engine.views import make_views

PRE = {
    "orientation": "RAS",
    "spacing": [3.0, 3.0, 3.0],
    "input_size": [64, 64, 64],
    "intensity": {"clip_percentiles": [0.5, 99.5], "normalize": "zscore"},
    "tile_overlap": 0.25,
}
SHAPE = (150, 140, 40)
CENTER = np.array([12.0, -20.0, 30.0])  # the structure; x = 0 cuts the field of view off-centre
RADII = np.array([35.0, 25.0, 20.0])
LOW, HIGH = 10.0, 110.0
MIN_DICE = 0.9
VIEW_KINDS = ("global", "tiles")


def _rotation(deg_x: float, deg_y: float) -> np.ndarray:
    ax, ay = np.radians([deg_x, deg_y])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return ry @ rx


AXIAL = np.diag([-1.0, -1.0, 1.0])  # DICOM's usual axial (LPS rows/columns) in RAS
ROT_Z90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
# direction cosines (columns: world direction of i, j, k), voxel sizes, and whether the series
# goes through a NIfTI file and the engine's reader
ORIENTATIONS = {
    "axial": (AXIAL, (1.6, 1.6, 3.0), False),
    "sagittal": (np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float).T, (1.5, 1.5, 3.5), False),
    "coronal": (np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float).T, (1.5, 1.5, 4.0), False),
    "oblique": (_rotation(20, 15) @ AXIAL, (1.6, 1.6, 3.0), False),
    "decubitus": (ROT_Z90 @ AXIAL, (1.6, 1.6, 3.0), False),  # lying on the side: rows/columns turned 90° about z
    "flipped": (np.diag([1.0, 1.0, -1.0]), (1.6, 1.6, 2.5), False),
    "nifti-las": (np.diag([-1.0, 1.0, 1.0]), (1.6, 1.6, 3.0), True),
    "nifti-ras": (np.eye(3), (1.6, 1.6, 3.0), True),
}


def native_grid(name: str) -> np.ndarray:
    dirs, sizes, _ = ORIENTATIONS[name]
    affine = np.eye(4)
    affine[:3, :3] = dirs * np.asarray(sizes)
    affine[:3, 3] = CENTER + np.array([5.0, -3.0, 2.0]) - affine[:3, :3] @ ((np.asarray(SHAPE) - 1) / 2)
    return affine


def structure_image(affine: np.ndarray) -> np.ndarray:
    idx = np.indices(SHAPE).reshape(3, -1).T
    inside = ((((apply_affine(affine, idx) - CENTER) / RADII) ** 2).sum(axis=1) <= 1.0).reshape(SHAPE)
    return np.where(inside, HIGH, LOW).astype(np.float32)


def load_series(name: str, tmp: Path) -> tuple[Volume, np.ndarray]:
    """The engine's Volume for an orientation, and the affine the check trusts (the NIfTI file's
    own, read independently with nibabel, for series that go through a file)."""
    affine = native_grid(name)
    data = structure_image(affine)
    if not ORIENTATIONS[name][2]:
        return Volume(data, affine), affine
    path = tmp / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    (ref,) = engine.scan([path]).series
    from engine.discover import load

    volume = load(ref)
    truth = nib.load(str(path))
    assert volume.shape == truth.shape and np.allclose(volume.affine, truth.affine, atol=1e-4)
    return volume, np.asarray(truth.affine, dtype=np.float64)


class NullBackend:
    """Features are irrelevant to these heads: constant tensors of the right structure."""

    name = "null"

    def encode(self, images: torch.Tensor) -> list[Features]:
        return [
            Features(cls=torch.zeros(4), tokens=torch.zeros(8, 4), layers={}, grid=(2, 2, 2))
            for _ in range(images.shape[0])
        ]


def head_class(name: str, view: str, predict, labels=("fg",), image: bool = True, **mask) -> type[engine.Head]:
    spec = {
        "name": name,
        "version": "1",
        "encoder": {"fingerprint": "any"},
        "inputs": {"view": view, "image": image, "features": ["cls"]},
        "outputs": [{"name": "mask", "kind": "mask", "dtype": "uint8", "labels": list(labels), **mask}],
    }

    class TestHead(engine.Head):
        manifest_ = spec

        def predict(self, batch):
            return [{"mask": predict(item)} for item in batch]

    TestHead.__name__ = f"{name.title()}Head"
    return TestHead


def all_foreground(item: engine.HeadInput) -> np.ndarray:
    return np.ones((1, *item.shape), np.float32)


def threshold_at(t: float):
    def predict(item: engine.HeadInput) -> np.ndarray:
        return (item.image.numpy() > t).astype(np.float32)

    return predict


def right_half(item: engine.HeadInput) -> np.ndarray:
    """Foreground where world x > 0, from the view's axis directions, spacing and origin."""
    info = item.view_info
    x = np.full(info.shape, info.world_origin[0])
    for axis in range(3):
        step = info.directions[axis][0] * info.spacing[axis]
        shape = [1, 1, 1]
        shape[axis] = info.shape[axis]
        x = x + step * np.arange(info.shape[axis]).reshape(shape)
    return (x > 0)[None].astype(np.float32)


def make_heads(kind: str, t: float) -> dict[str, engine.Head]:
    classes = {
        "all": head_class("all", kind, all_foreground),
        "threshold": head_class("threshold", kind, threshold_at(t)),
        "half": head_class("half", kind, right_half),
    }
    return {name: cls(cls.manifest_, {}, None) for name, cls in classes.items()}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


@lru_cache(maxsize=None)
def measure(name: str, kind: str, tmp: str) -> dict[str, float | bool]:
    """Run the three heads on one orientation and view kind; measure against the native grid."""
    volume, truth_affine = load_series(name, Path(tmp))
    views = make_views(volume, PRE, (kind,))
    # the view threshold halfway between background and structure, in the view's units
    image = views[kind].image.numpy()
    t = float(image.min() + image.max()) / 2.0
    prep = Prepared(name, volume.shape, volume.affine, {}, views)
    (res,) = Inference(NullBackend(), make_heads(kind, t), None).run([prep])
    assert res.errors == {}, res.errors
    masks = {o.head: np.asarray(o.value) for o in res.outputs}
    native_threshold = volume.data > (LOW + HIGH) / 2.0
    world_x = apply_affine(truth_affine, np.indices(volume.shape).reshape(3, -1).T)[:, 0].reshape(volume.shape)
    margin = float(np.max(np.linalg.norm(views[kind].affine[:3, :3], axis=0)))  # one view voxel
    half = masks["half"].astype(bool)
    return {
        "coverage": float(masks["all"].mean() * 100.0),
        "dice": dice(masks["threshold"].astype(bool), native_threshold),
        "half_correct": bool(half[world_x > margin].all() and not half[world_x < -margin].any()),
        "half_right": float(half[world_x > margin].mean()),
        "half_left": float(half[world_x < -margin].mean()),
        "shapes_ok": all(m.shape == volume.shape for m in masks.values()),
        "labels": [o.decl["labels"] for o in res.outputs],
    }


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("contract"))


CASES = [(name, kind) for name in ORIENTATIONS for kind in VIEW_KINDS]


@pytest.mark.parametrize("name, kind", CASES)
def test_all_foreground_head_covers_every_native_voxel(name, kind, tmp_dir):
    m = measure(name, kind, tmp_dir)
    assert m["shapes_ok"]
    assert m["coverage"] == 100.0, f"{name}/{kind}: {m['coverage']:.3f} % of native voxels foreground"
    assert m["labels"][0] == ["background", "fg"], "a one-channel mask is stored with a background label"


@pytest.mark.parametrize("name, kind", CASES)
def test_threshold_head_matches_the_threshold_on_the_native_grid(name, kind, tmp_dir):
    m = measure(name, kind, tmp_dir)
    assert m["dice"] >= MIN_DICE, f"{name}/{kind}: Dice {m['dice']:.3f}"


@pytest.mark.parametrize("name, kind", CASES)
def test_half_field_head_lands_on_the_right_side_of_the_patient(name, kind, tmp_dir):
    m = measure(name, kind, tmp_dir)
    assert m["half_correct"], f"{name}/{kind}: right {m['half_right']:.3f} foreground, left {m['half_left']:.3f}"


def test_view_info_describes_the_view_and_valid_marks_the_acquired_region(tmp_dir):
    volume, _ = load_series("oblique", Path(tmp_dir))
    views = make_views(volume, PRE)
    seen: list[engine.HeadInput] = []

    def record(item):
        seen.append(item)
        return np.zeros((1, *item.shape), np.float32)

    heads = {k: head_class(k, k, record) for k in VIEW_KINDS}
    heads = {k: cls(cls.manifest_, {}, None) for k, cls in heads.items()}
    Inference(NullBackend(), heads, None).run([Prepared("s", volume.shape, volume.affine, {}, views)])
    for item in seen:
        info = item.view_info
        view = views[info.kind]
        assert info.axis_codes == "RAS" and np.allclose(info.directions, np.eye(3))
        assert item.valid.shape == item.image.shape and item.valid.dtype == torch.bool
        # the window's world position agrees with the view's affine at the window origin
        assert np.allclose(info.to_world([[0, 0, 0]])[0], apply_affine(view.affine, [info.origin])[0])
        image = item.image.numpy()
        if (~item.valid).any():
            assert np.allclose(image[~item.valid.numpy()], info.padding_value, atol=1e-4), (
                "padding is clipped background"
            )
    origins = {i.view_info.origin for i in seen if i.view_info.kind == "tiles"}
    assert len(origins) == len(views["tiles"].windows) > 1
    g = next(i for i in seen if i.view_info.kind == "global")
    assert 0.2 < g.valid.float().mean() < 1.0, "an oblique series leaves padding in the corners of its view"


# ---- broken heads --------------------------------------------------------------------------


def small_series(key: str) -> Prepared:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    volume = Volume(np.random.default_rng(0).random((40, 40, 20), dtype=np.float32), affine)
    return Prepared(key, volume.shape, volume.affine, {}, make_views(volume, PRE, ("global",)))


def value_head(name: str, predict, **extra) -> engine.Head:
    spec = {
        "name": name,
        "version": "1",
        "encoder": {"fingerprint": "any"},
        **extra,
        "inputs": {"view": "global", "features": ["cls"]},
        "outputs": [{"name": "v", "kind": "value", "dtype": "float32", "shape": [], "units": "1"}],
    }

    class ValueHead(engine.Head):
        def predict(self, batch):
            return predict(batch)

    return ValueHead(spec, {}, None)


def ok(batch):
    return [{"v": 1.0} for _ in batch]


def raises(batch):
    raise RuntimeError("weights went missing")


BROKEN = {
    "raises": (raises, "head 'broken' raised RuntimeError: weights went missing"),
    "wrong shape": (lambda b: [{"v": np.ones(3)} for _ in b], "head 'broken' output 'v': expected 0 dimensions"),
    "nan": (lambda b: [{"v": float("nan")} for _ in b], "head 'broken' output 'v': values must be finite"),
    "inf": (lambda b: [{"v": float("inf")} for _ in b], "head 'broken' output 'v': values must be finite"),
    "undeclared output": (
        lambda b: [{"v": 1.0, "extra": 2.0} for _ in b],
        "head 'broken' output 'extra': output not declared",
    ),
    "missing output": (lambda b: [{} for _ in b], "head 'broken' output 'v': declared output missing"),
    "empty batch": (lambda b: [], "predict returned 0 results for 2 inputs"),
    "not a list": (lambda b: {"v": 1.0}, "predict must return a list of dicts"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_head_fails_only_itself_with_its_reason(case):
    predict, reason = BROKEN[case]
    heads = {"good": value_head("good", ok), "broken": value_head("broken", predict)}
    results = Inference(NullBackend(), heads, None).run([small_series("a"), small_series("b")])
    for res in results:
        assert set(res.errors) == {"broken"} and reason in res.errors["broken"], res.errors
        assert [o.head for o in res.outputs] == ["good"]


def test_mask_channels_that_break_the_declaration_name_head_output_expected_and_got():
    cls = head_class("masker", "global", lambda item: np.ones((2, *item.shape), np.float32), labels=("lesion",))
    (res,) = Inference(NullBackend(), {"masker": cls(cls.manifest_, {}, None)}, None).run([small_series("a")])
    reason = res.errors["masker"]
    assert "head 'masker' output 'mask'" in reason and "(1, 64, 64, 64)" in reason and "got (2, 64, 64, 64)" in reason


def test_multilabel_masks_are_stored_one_channel_per_label():
    def predict(item):
        fg = np.zeros((2, *item.shape), np.float32)
        fg[0] = 1.0  # every voxel is 'a'
        fg[1, : item.shape[0] // 2] = 0.7  # the -x half is also 'b', above a 0.6 threshold
        return fg

    cls = head_class("multi", "global", predict, labels=("a", "b"), multilabel=True, threshold=0.6)
    prep = small_series("a")
    (res,) = Inference(NullBackend(), {"multi": cls(cls.manifest_, {}, None)}, None).run([prep])
    (out,) = res.outputs
    assert out.value.shape == (2, *prep.shape) and out.value.dtype == np.uint8
    assert out.value[0].all() and 0 < out.value[1].mean() < 1
    assert out.decl["labels"] == ["a", "b"] and out.decl["threshold"] == 0.6


def test_softmax_masks_keep_the_argmax_label_map():
    def predict(item):
        p = np.zeros((3, *item.shape), np.float32)
        p[2] = 1.0
        return p

    cls = head_class("soft", "global", predict, labels=("background", "x", "y"))
    prep = small_series("a")
    (res,) = Inference(NullBackend(), {"soft": cls(cls.manifest_, {}, None)}, None).run([prep])
    assert (res.outputs[0].value == 2).all() and res.outputs[0].decl["labels"] == ["background", "x", "y"]


def test_a_head_over_budget_fails_its_batch_and_is_disabled_after_repeated_overruns():
    calls: list[int] = []

    def sleepy(batch):
        calls.append(len(batch))
        time.sleep(0.6)
        return ok(batch)

    events: list[dict] = []
    heads = {"good": value_head("good", ok), "sleepy": value_head("sleepy", sleepy, budget_seconds=30)}
    inference = Inference(
        NullBackend(), heads, None, batch_size=1, budgets={"sleepy": 0.2}, max_overruns=2, on_event=events.append
    )
    t0 = time.perf_counter()
    results = inference.run([small_series(k) for k in "abcd"])
    assert time.perf_counter() - t0 < 2.5, "the run stops waiting at the budget"
    reasons = [r.errors["sleepy"] for r in results]
    assert reasons[0].startswith("head 'sleepy' exceeded its time budget of 0.2 s on a batch of 1 series")
    assert "disabled for the rest of the run" in reasons[1]
    assert reasons[2] == reasons[3] == "head 'sleepy' disabled after 2 overruns of its time budget of 0.2 s"
    assert all([o.head for o in r.outputs] == ["good"] for r in results)
    # progress names the head, batch and series before and after each call
    sleepy_events = [e for e in events if e["head"] == "sleepy"]
    assert [(e["batch"], e["state"]) for e in sleepy_events] == [
        (1, "started"),
        (1, "over budget"),
        (2, "started"),
        (2, "over budget"),
    ]
    assert sleepy_events[0]["series"] == ["a"] and sleepy_events[1]["seconds"] >= 0.2
    assert [e["state"] for e in events if e["head"] == "good"] == ["started", "done"] * 4
    time.sleep(0.8)
    assert len(calls) <= 2, "a disabled head is never called again, nor twice at once"


def test_manifest_budget_applies_when_the_run_sets_none():
    heads = {"slow": value_head("slow", lambda b: (time.sleep(0.5), ok(b))[1], budget_seconds=0.1)}
    (res,) = Inference(NullBackend(), heads, None).run([small_series("a")])
    assert "exceeded its time budget of 0.1 s" in res.errors["slow"]
    (res,) = Inference(NullBackend(), heads, None, budgets={"slow": None}).run([small_series("a")])
    assert res.errors == {}, "a run may lift a manifest's budget"
