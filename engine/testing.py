"""Test a head the way ``mrfm run`` runs it.

:func:`run_head` sends one volume through the real path — views (``engine.views``), the encoder
backend, the head's ``predict``, the output checks against its manifest, and the mapping back to
the native grid (``engine.inference.Inference``) — and, given ``store=``, writes the series into
a result store and reads it back. Volumes come from :func:`synthetic_volume` (known geometry and
content, any orientation), a NIfTI/DICOM path, or an :class:`engine.Volume`.

With mrfm installed, pytest also gets the fixtures ``mrfm_volume`` and ``mrfm_run_head``
(``engine.pytest_plugin``)::

    def test_my_head(mrfm_run_head):
        result = mrfm_run_head(MyHead, "oblique")
        assert result.outputs["lesion"].shape == result.volume.shape
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import HeadRunError, UsageError
from .geometry import Volume, apply_affine
from .hookspecs import hookimpl

__all__ = [
    "SYNTHETIC_KINDS",
    "HeadResult",
    "HeadRunError",
    "dice",
    "heads_of",
    "load_volume",
    "run_head",
    "synthetic_truth",
    "synthetic_volume",
]

SYNTHETIC_KINDS: tuple[str, ...] = ("axial", "sagittal", "coronal", "oblique", "flipped", "decubitus", "ras", "las")

# World-space content of every synthetic volume (RAS+ mm, centred on the origin): a soft-tissue
# ellipsoid and a bright sphere to the patient's right (+x), anterior and superior of centre, so
# a head can be checked for side, position and shape whatever the acquisition orientation.
BODY_RADII_MM = (60.0, 70.0, 55.0)
BRIGHT_CENTER_MM = (25.0, 10.0, 5.0)
BRIGHT_RADIUS_MM = 25.0  # > 0.5 % of the field of view, so intensity clipping keeps it bright
BODY_INTENSITY, BRIGHT_INTENSITY, NOISE = 100.0, 300.0, 5.0


@dataclass
class HeadResult:
    """What one head produced for one volume, after the engine's checks and mapping.

    ``outputs``: output name -> value on the native grid (masks: arrays of ``volume.shape``, or
    (C, *volume.shape) for multilabel masks; boxes: dict with ``world`` (N, 6) RAS mm, ``voxel``
    (N, 6) native voxel coordinates, ``scores`` and ``labels``/``queries``; others: arrays).
    ``declarations``: output name -> the declaration stored beside it. ``errors``: head ->
    reason when the head failed. ``inputs``/``predicted``: what ``predict`` received and
    returned, per view window, in view space. ``stored``: outputs read back from the store.
    """

    head: str
    outputs: dict[str, Any]
    errors: dict[str, str]
    volume: Volume
    views: dict[str, Any]
    declarations: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: list[Any] = field(default_factory=list)
    predicted: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stored: dict[str, Any] | None = None
    store_attrs: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]


# ---- volumes --------------------------------------------------------------------------------------
def _axes(kind: str) -> np.ndarray:
    """3x3 matrix whose columns are the array axes' unit directions in RAS."""
    from .synthetic.acquisition import plane_axes  # generated volumes only for the synthetic kinds
    from .synthetic.spatial import rotation  # generated volumes only for the synthetic kinds

    if kind in ("axial", "sagittal", "coronal", "oblique"):
        return plane_axes(kind)
    if kind == "flipped":  # rows and slices reversed, as a scanner may store them
        return plane_axes("axial") * np.array([-1.0, 1.0, -1.0])
    if kind == "decubitus":  # patient on their side: the axial plane turned 90 degrees
        return rotation("z", 90.0) @ plane_axes("axial")
    if kind == "ras":
        return np.eye(3)
    if kind == "las":
        return np.diag([-1.0, 1.0, 1.0])
    raise UsageError(f"unknown synthetic volume {kind!r}; expected one of {', '.join(SYNTHETIC_KINDS)}")


def _affine(kind: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    linear = _axes(kind) * np.asarray(spacing, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2.0)  # grid centred on the origin
    return affine


def _world_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1).reshape(-1, 3)
    return apply_affine(affine, ijk.astype(np.float64)).reshape(*shape[:3], 3)


def synthetic_truth(shape: tuple[int, ...], affine: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the synthetic content on any grid: ``body`` and ``bright`` (the sphere)."""
    world = _world_points(shape, affine)
    body = (((world / np.asarray(BODY_RADII_MM)) ** 2).sum(-1)) <= 1.0
    bright = np.linalg.norm(world - np.asarray(BRIGHT_CENTER_MM), axis=-1) <= BRIGHT_RADIUS_MM
    return {"body": body, "bright": bright}


def synthetic_volume(
    kind: str = "axial",
    *,
    shape: tuple[int, int, int] = (40, 40, 24),
    spacing: tuple[float, float, float] = (4.0, 4.0, 6.0),
    seed: int = 0,
) -> Volume:
    """A volume with known geometry and content, acquired as ``kind`` (see SYNTHETIC_KINDS).

    The same anatomy in every orientation: a body ellipsoid (intensity 100, radii
    ``BODY_RADII_MM``) holding a bright sphere (300, ``BRIGHT_RADIUS_MM`` at
    ``BRIGHT_CENTER_MM``, patient right), plus Gaussian noise from ``seed``. ``meta`` records the
    kind and the truth; :func:`synthetic_truth` gives the masks on any grid.
    """
    affine = _affine(kind, tuple(shape), tuple(spacing))
    truth = synthetic_truth(tuple(shape), affine)
    rng = np.random.default_rng(seed)
    data = np.where(truth["body"], BODY_INTENSITY, 0.0)
    data = np.where(truth["bright"], BRIGHT_INTENSITY, data) + rng.normal(0.0, NOISE, size=tuple(shape))
    meta = {
        "series_key": f"synthetic-{kind}",
        "synthetic": kind,
        "bright_center_mm": list(BRIGHT_CENTER_MM),
        "bright_radius_mm": BRIGHT_RADIUS_MM,
        "body_radii_mm": list(BODY_RADII_MM),
    }
    return Volume(data.astype(np.float32), affine, meta)


def load_volume(source: Volume | str | Path, *, series: str | None = None) -> Volume:
    """A Volume from a Volume, a synthetic kind, or a NIfTI/DICOM file, folder or zip.

    A path holding several series needs ``series`` (a series key or SeriesInstanceUID).
    """
    if isinstance(source, Volume):
        return source
    if isinstance(source, str) and source in SYNTHETIC_KINDS:
        return synthetic_volume(source)
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{source!s}: neither a synthetic volume ({', '.join(SYNTHETIC_KINDS)}) nor an existing path")
    from .discover import load, scan  # the head kit loads the run path when a test runs a head, not when it is imported

    refs = list(scan([path]).series)
    if series is not None:
        refs = [r for r in refs if series in (r.key, r.series_uid)]
    if len(refs) != 1:
        keys = ", ".join(r.key for r in refs) or "none"
        raise UsageError(f"{path}: expected one series, found {len(refs)} ({keys}); pick one with series=")
    volume = load(refs[0])
    volume.meta.setdefault("series_key", refs[0].key)
    return volume


# ---- model, backend, heads ------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _model(path: str | None) -> Any:
    from .model import load_model  # the head kit loads the run path when a test runs a head, not when it is imported

    return load_model(path)


@lru_cache(maxsize=8)
def _backend(path: str | None, name: str, device: str | None) -> Any:
    from .backends import select  # the head kit loads the run path when a test runs a head, not when it is imported

    return select(name, _model(path), **({"device": device} if device else {}))[0]


def _text(model: Any, queries: list[str] | None) -> Any:
    if not queries:
        return None
    from .features import (
        TextFeatures,
    )  # the head kit loads the run path when a test runs a head, not when it is imported

    tower = model.text_tower()
    if tower is None:
        raise HeadRunError("queries given but the model has no text tower")
    with torch.inference_mode():
        return TextFeatures(list(queries), tower.encode(list(queries)))


def heads_of(plugin: Any) -> list[type]:
    """The head classes a plugin module or object registers through ``register_heads``
    (checks a package's hook wiring without installing its entry point)."""
    found: list[type] = []
    hook = getattr(plugin, "register_heads", None)
    if hook is None:
        raise HeadRunError(f"{plugin!r} has no register_heads hook")
    hook(register=found.append)
    return found


class _KitPlugin:
    """Registers the head under test for the duration of one run."""

    def __init__(self, head_cls: type):
        self.head_cls = head_cls

    @hookimpl
    def register_heads(self, register: Any) -> None:
        register(self.head_cls)


@contextlib.contextmanager
def _registered(head: type | str) -> Iterator[str]:
    """The head's name, with the class registered with the plugin manager while in use."""
    from .plugins import (
        get_broken_heads,
        get_head_classes,
        head_problem,
        pm,
    )  # the head kit loads the run path when a test runs a head, not when it is imported

    if isinstance(head, str):
        broken = get_broken_heads()
        if head in broken:
            raise HeadRunError(f"head {head!r} is broken: {broken[head].reason}")
        if head not in get_head_classes():
            raise HeadRunError(f"no head named {head!r}; installed: {', '.join(sorted(get_head_classes()))}")
        yield head
        return
    problem = head_problem(head)
    if problem:
        raise HeadRunError(f"{head.__qualname__}: {problem}")
    name = head.manifest()["name"]
    current = get_head_classes().get(name)
    if current is not None and current.obj is head:
        yield name
        return
    plugin = _KitPlugin(head)
    pm.register(plugin, name=f"engine.testing:{name}")
    try:
        if name not in get_head_classes():
            reason = get_broken_heads().get(name)
            raise HeadRunError(
                f"head {name!r} could not be registered: {reason.reason if reason else 'unknown reason'}"
            )
        yield name
    finally:
        pm.unregister(plugin)


def _inference(
    backend: Any, heads: dict[str, Any], text: Any, batch_size: int, budget: float | None, events: list[dict[str, Any]]
) -> Any:
    from .inference import Inference  # the head kit loads the run path when a test runs a head, not when it is imported

    accepted = inspect.signature(Inference).parameters
    options: dict[str, Any] = {}
    if "on_event" in accepted:
        options["on_event"] = events.append
    if budget is not None and "budgets" in accepted:
        options["budgets"] = {name: budget for name in heads}
    return Inference(backend, heads, text, batch_size, **options)


def _capture(head: Any, inputs: list[Any], predicted: list[dict[str, Any]]) -> None:
    """Record what ``predict`` receives and returns, per item, without changing it."""
    original = head.predict

    def predict(batch: list[Any]) -> Any:
        out = original(batch)
        inputs.extend(batch)
        predicted.extend(out if isinstance(out, list) else [])
        return out

    head.predict = predict


# ---- the run ---------------------------------------------------------------------------------------
def run_head(
    head: type | str,
    volume: Volume | str | Path = "axial",
    *,
    params: dict[str, Any] | None = None,
    queries: list[str] | None = None,
    model: str | Path | None = None,
    backend: str = "torch",
    device: str | None = None,
    batch_size: int = 2,
    budget: float | None = None,
    series: str | None = None,
    store: str | Path | None = None,
    check: bool = True,
) -> HeadResult:
    """Run one head (a class, or the name of an installed head) on one volume the way a run does.

    ``volume``: an :class:`engine.Volume`, a synthetic kind (``"axial"``, ``"oblique"`` ... see
    SYNTHETIC_KINDS) or a NIfTI/DICOM path (``series`` picks one of several). ``params`` are the
    head's run parameters, ``queries`` the run's text queries, ``model`` a model folder (default:
    the embedded model), ``budget`` a time limit per predict call in seconds. With ``store``,
    the series is also written to that result store and read back (``result.stored``).
    With ``check`` (default), a head that fails raises :class:`HeadRunError` with the reason;
    otherwise the reason is in ``result.errors``.
    """
    from .inference import (
        load_heads,
    )  # the head kit loads the run path when a test runs a head, not when it is imported
    from .prepare import Prepared  # the head kit loads the run path when a test runs a head, not when it is imported
    from .views import make_views  # the head kit loads the run path when a test runs a head, not when it is imported

    vol = load_volume(volume, series=series)
    key = str(vol.meta.get("series_key", "volume"))
    model_key = str(Path(model).expanduser().resolve()) if model is not None else None
    mdl = _model(model_key)
    enc = _backend(model_key, backend, device)
    text = _text(mdl, queries)
    with _registered(head) as name:
        all_params = {name: dict(params or {})}
        heads, warnings = load_heads([name], mdl, getattr(enc, "device", torch.device("cpu")), all_params, text)
    if name not in heads:
        raise HeadRunError(f"head {name!r} was not loaded: {'; '.join(warnings) or 'no reason given'}")
    events: list[dict[str, Any]] = []
    inference = _inference(enc, heads, text, batch_size, budget, events)
    prep = Prepared(
        key, vol.shape, vol.affine, dict(vol.meta), make_views(vol, mdl.preprocessing, inference.view_kinds())
    )
    result = HeadResult(name, {}, {}, vol, prep.views, events=events, warnings=list(warnings))
    _capture(heads[name], result.inputs, result.predicted)
    try:
        with torch.inference_mode():
            (outputs,) = inference.run([prep])
    finally:
        getattr(inference, "close", lambda: None)()
    result.errors = dict(outputs.errors)
    for out in outputs.outputs:
        result.outputs[out.decl["name"]] = out.value
        result.declarations[out.decl["name"]] = out.decl
    if store is not None and result.ok:
        _write_and_read(store, prep, name, heads[name], outputs.outputs, result)
    if check and not result.ok:
        raise HeadRunError("; ".join(result.errors.values()))
    return result


def _write_and_read(path: str | Path, prep: Any, name: str, head: Any, outputs: list[Any], result: HeadResult) -> None:
    """Write the series as a run would (geometry, head record, outputs, status last) and read it back."""
    from .store import ResultStore  # the head kit loads the run path when a test runs a head, not when it is imported

    store = ResultStore(path, mode="a")
    geometry = {
        "shape": list(prep.shape),
        "affine": np.asarray(prep.affine).tolist(),
        "frame": "RAS+ mm; affine maps voxel (i, j, k, 1) to world",
    }
    record = {
        "version": head.spec["version"],
        "outputs": [d["name"] for d in head.spec["outputs"]],
        "error": None,
        "fingerprint": "engine.testing",
        "run_id": "engine.testing",
    }
    attrs = {"series_key": prep.key, "geometry": geometry, "heads": {name: record}, "run_id": "engine.testing"}
    store.write_series(prep.key, attrs, outputs, "complete", replace=True)
    result.store_attrs = store.series_attrs(prep.key)
    result.stored = {d["name"]: store.read_output(prep.key, name, d["name"]) for d in head.spec["outputs"]}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total
