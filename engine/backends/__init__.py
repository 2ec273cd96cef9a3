"""Encoder backends: choose one (``select``), or build one ahead of time (``compile_backend``).

Backends are found through the plugin manager (``register_backends``); the built-in ones are
``torch``, ``onnxruntime``, ``torch-compile`` and ``tensorrt`` (see ``plugins/backends``).
``auto`` tries them by ``auto_priority``: TensorRT -> torch.compile -> onnxruntime -> torch.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendUnavailable, UsageError
from .base import PRECISIONS, Backend, CastEncoder, ShapeRange
from .cache import EngineCache, cache_key, default_cache_dir, device_identity

if TYPE_CHECKING:
    from ..model import Model

log = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "Backend",
    "CastEncoder",
    "EngineCache",
    "ShapeRange",
    "available_backends",
    "backend_classes",
    "cache_key",
    "compile_backend",
    "default_cache_dir",
    "device_identity",
    "select",
]


def backend_classes() -> dict[str, type[Backend]]:
    """Registered backend name -> class, from every plugin."""
    from ..plugins import get_backends  # the plugin manager loads backend plugins, which import this package

    return {name: reg.obj for name, reg in get_backends().items()}


def available_backends(device: str | torch.device | None = None) -> list[dict[str, Any]]:
    """Every registered backend with whether it can run here and why: for ``mrfm`` listings."""
    out = []
    for name, cls in sorted(backend_classes().items(), key=lambda kv: -kv[1].auto_priority):
        ok, why = cls.available(device)
        out.append(
            {
                "name": name,
                "available": ok,
                "reason": why,
                "precisions": list(cls.precisions),
                "auto_priority": cls.auto_priority,
            }
        )
    return out


def select(name: str, model: Model, **kw: Any) -> tuple[Backend, str]:
    """Instantiate backend ``name`` (or the best available for ``"auto"``) for ``model``.

    Returns the backend and a human-readable reason, e.g.
    ``"auto: tensorrt: tensorrt is not installed; torch-compile: CUDA is not available -> onnxruntime"``.
    Keyword arguments go to the backend's constructor (precision, device, cache_dir, max_batch,
    shapes). An explicitly named backend that cannot run raises with the reason.
    """
    classes = backend_classes()
    device = kw.get("device")
    precision = kw.get("precision", "fp32")
    if name != "auto":
        if name not in classes:
            raise UsageError(f"unknown backend {name!r}; registered backends: {', '.join(sorted(classes)) or 'none'}")
        cls = classes[name]
        ok, why = cls.available(device)
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is not available: {why}")
        return cls(model, **kw), f"{name}: requested"
    notes: list[str] = []
    ranked = sorted((c for c in classes.values() if c.auto_priority > 0), key=lambda c: (-c.auto_priority, c.name))
    for cls in ranked:
        ok, why = cls.available(device)
        if not ok:
            notes.append(f"{cls.name}: {why}")
            continue
        if precision not in cls.precisions:
            notes.append(f"{cls.name}: no {precision} support")
            continue
        try:
            backend = cls(model, **kw)
        except Exception as exc:  # a backend that fails to build must not stop the run
            log.warning("backend %s failed to start: %s", cls.name, exc)
            notes.append(f"{cls.name}: failed to start ({type(exc).__name__}: {exc})")
            continue
        return backend, ("auto: " + "; ".join(notes) + " " if notes else "auto: ") + f"-> {cls.name}"
    raise BackendUnavailable("auto: no backend could run: " + "; ".join(notes))


def compile_backend(
    model: Model,
    backend: str = "auto",
    precision: str = "fp32",
    max_batch: int = 4,
    shapes: ShapeRange | list[tuple[int, int, int]] | None = None,
    *,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Build (or find in the cache) the artifact a backend needs; report what, where, how long.

    ``shapes`` is a :class:`ShapeRange` or a list of spatial sizes to cover (default: two
    patches per axis up to the model's input size).
    """
    if shapes is not None and not isinstance(shapes, ShapeRange):
        shapes = ShapeRange.covering([tuple(int(v) for v in s) for s in shapes], max_batch=max_batch)  # type: ignore[misc]
    start = time.perf_counter()
    kw: dict[str, Any] = {
        "precision": precision,
        "max_batch": max_batch,
        "shapes": shapes,
        "device": device,
        "cache_dir": cache_dir,
    }
    instance, reason = select(backend, model, **kw)
    warm = getattr(instance, "warm_up", None)
    if callable(warm):
        warm()
    info = instance.describe()
    info.update(
        {
            "reason": reason,
            "model": model.name,
            "fingerprint": model.fingerprint,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    return info
