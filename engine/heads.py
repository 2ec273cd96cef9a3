"""The head contract: a base class, manifest loading, and the check every output passes before
it is written. Heads work in view space; the engine does all geometry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from . import schemas
from .errors import HeadOutputError, UsageError
from .features import HeadInput, TextFeatures


@dataclass
class HeadContext:
    """What a head may know about the run when it is set up."""

    device: torch.device
    embed_dim: int
    grid: tuple[int, int, int]
    input_size: tuple[int, int, int]
    model_fingerprint: str
    params: dict[str, Any] = field(default_factory=dict)
    text: TextFeatures | None = None


class Head:
    """Base class for heads. Subclasses set ``manifest_path`` and implement :meth:`predict`.

    ``predict`` receives a batch of :class:`HeadInput` and returns, per item and in the same
    order, a dict with one entry per declared output (see :meth:`predict`).
    """

    manifest_path: ClassVar[Path]
    _manifest_cache: ClassVar[dict[str, Any] | None] = None

    def __init__(self, manifest: dict[str, Any], weights: dict[str, torch.Tensor], context: HeadContext):
        self.spec = manifest
        self.weights = weights
        self.context = context

    @classmethod
    def manifest(cls) -> dict[str, Any]:
        """The validated manifest of this head class."""
        if cls.__dict__.get("_manifest_cache") is None:
            data = json.loads(Path(cls.manifest_path).read_text())
            schemas.validate("head", data, f"head manifest {cls.manifest_path}")
            cls._manifest_cache = data
        return cls._manifest_cache  # type: ignore[return-value]

    @classmethod
    def weights_path(cls) -> Path | None:
        rel = cls.manifest().get("weights")
        return Path(cls.manifest_path).parent / rel if rel else None

    def predict(self, batch: list[HeadInput]) -> list[dict[str, Any]]:  # pragma: no cover - abstract
        """One dict per input item, holding every declared output and nothing else:

        - ``scores``: array (C,) with one value per declared label.
        - ``value``: array of the declared shape (a 0-d array for a scalar), in the declared units.
        - ``embedding``: array of the declared shape.
        - ``mask``: probabilities (C, X, Y, Z) in [0, 1] over the input image's voxels, one
          channel per declared label. ``softmax`` masks (two or more labels, background first):
          channels sum to 1, stored as the argmax label. ``sigmoid`` masks (one label): the
          foreground probability, stored 0/1 with labels [background, label] where
          p >= threshold (default 0.5). ``multilabel`` masks: one independent probability
          per label, stored as one 0/1 channel per label.
        - ``boxes``: dict with ``boxes`` (N, 6) as (i0, j0, k0, i1, j1, k1) in continuous
          voxel coordinates of the input image (voxel centres at integers, the image spans
          [-0.5, n - 0.5]), ``scores`` (N,), and optionally ``labels`` (N declared label
          names) or ``queries`` (N str).

        Outputs must be finite; anything that breaks the manifest fails this head on the
        series concerned, never the run. Each item carries ``valid`` (the acquired region
        of its image) and ``view_info`` (axes, spacing, intensity transform, window origin):
        see :class:`HeadInput` and :class:`ViewInfo`. A manifest's ``budget_seconds`` limits
        one call; the engine stops waiting at the budget (the call itself cannot be stopped
        and finishes in the background) and disables a head that overruns repeatedly.
        """
        raise NotImplementedError


class NetHead(Head):
    """A head whose parameters are one torch module: ``build_net(embed_dim)`` builds it and the
    head's safetensors weights are its ``state_dict``; it runs in eval mode on the context's device.
    Subclasses set ``build_net`` and implement :meth:`predict` with ``self.net``."""

    build_net: ClassVar[Any]

    def __init__(self, manifest: dict[str, Any], weights: dict[str, torch.Tensor], context: HeadContext):
        super().__init__(manifest, weights, context)
        embed_dim = manifest["encoder"].get("embed_dim", context.embed_dim)
        if context.embed_dim != embed_dim:
            raise UsageError(f"{manifest['name']} expects embed_dim {embed_dim}, the encoder gives {context.embed_dim}")
        self.net = type(self).build_net(embed_dim)
        self.net.load_state_dict(weights)
        self.net.to(context.device).eval()

    def stack(self, batch: list[HeadInput], name: str) -> torch.Tensor:
        """One declared input (``image``, ``cls``, ``tokens``, ``joint``, ``layers[n]``) over the
        batch, as float32 on the head's device."""
        items = [item.image if name == "image" else item.features.get(name) for item in batch]
        return torch.stack(items).to(self.context.device, torch.float32)  # type: ignore[arg-type]  # declared inputs are present


def load_weights(head_cls: type[Head], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load a head's safetensors weights (never pickle)."""
    path = head_cls.weights_path()
    if path is None:
        return {}
    from safetensors.torch import load_file  # only heads with weights read them

    return load_file(str(path), device=str(device))


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def _check_shape(head: str, out: dict, arr: np.ndarray, symbols: dict[str, int]) -> None:
    declared = out.get("shape")
    if declared is None:
        return
    if len(declared) != arr.ndim:
        raise HeadOutputError(
            head, out["name"], f"expected {len(declared)} dimensions {declared}, got shape {arr.shape}"
        )
    for want, got in zip(declared, arr.shape):
        if isinstance(want, int) and want != got:
            raise HeadOutputError(head, out["name"], f"expected shape {declared}, got {arr.shape}")
        if want == "C" and got != len(out.get("labels", [])):
            raise HeadOutputError(
                head, out["name"], f"expected C={len(out.get('labels', []))} (one per label), got {got}"
            )


MASK_MODES = ("softmax", "sigmoid", "multilabel")


def mask_mode(head: str, out: dict[str, Any]) -> tuple[str, float]:
    """How a mask output's channels are read and stored: (mode, threshold).

    Manifests without ``activation`` keep their old meaning when they declare two or more
    labels (softmax, background first); a single label means a sigmoid foreground channel.
    """
    labels = out.get("labels") or []
    multilabel = bool(out.get("multilabel", False))
    activation = out.get("activation", "sigmoid" if multilabel or len(labels) == 1 else "softmax")
    threshold = float(out.get("threshold", 0.5))
    if not labels:
        raise HeadOutputError(head, out["name"], "a mask declares no labels")
    if activation == "softmax" and (multilabel or len(labels) < 2):
        raise HeadOutputError(head, out["name"], "a softmax mask needs two or more exclusive labels (background first)")
    if activation == "sigmoid" and not multilabel and len(labels) != 1:
        raise HeadOutputError(
            head, out["name"], f"a sigmoid mask with {len(labels)} labels must declare multilabel: true"
        )
    if activation not in ("softmax", "sigmoid") or not 0.0 < threshold <= 1.0:
        raise HeadOutputError(head, out["name"], f"unsupported activation {activation!r} or threshold {threshold}")
    mode = "multilabel" if multilabel else activation
    return mode, threshold


def stored_declaration(head: str, out: dict[str, Any]) -> dict[str, Any]:
    """The declaration as written beside the stored array: a sigmoid mask's stored labels gain
    the background, so label values index ``labels`` like every other label map."""
    if out["kind"] != "mask":
        return out
    mode, threshold = mask_mode(head, out)
    stored = {**out, "activation": "softmax" if mode == "softmax" else "sigmoid"}
    if mode != "softmax":
        stored["threshold"] = threshold
    if mode == "sigmoid":
        stored["labels"] = ["background", *out["labels"]]
        if out.get("colors") and len(out["colors"]) == 1:
            stored["colors"] = ["#000000", *out["colors"]]
    return stored


def _check_mask(head: str, out: dict[str, Any], arr: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    mode, _ = mask_mode(head, out)
    want = (len(out["labels"]), *image_shape)
    if arr.shape != want:
        raise HeadOutputError(
            head,
            out["name"],
            f"{mode} mask probabilities must be (C, X, Y, Z) = {want} (one channel per declared label), got {arr.shape}",
        )
    if arr.min() < -1e-4 or arr.max() > 1 + 1e-4:
        raise HeadOutputError(head, out["name"], "mask probabilities must lie in [0, 1]")
    return arr.astype(np.float32)


def check_output(head: str, out: dict[str, Any], value: Any, image_shape: tuple[int, int, int]) -> Any:
    """Check one output against its declaration; return it as numpy (dict of numpy for boxes).

    Raises :class:`HeadOutputError` with the reason when the value breaks the declaration.
    """
    kind, name = out["kind"], out["name"]
    if kind == "boxes":
        if not isinstance(value, dict) or "boxes" not in value or "scores" not in value:
            raise HeadOutputError(head, name, "boxes must be a dict with 'boxes' (N, 6) and 'scores' (N,)")
        boxes = (
            _to_numpy(value["boxes"]).astype(np.float64).reshape(-1, 6)
            if np.size(_to_numpy(value["boxes"]))
            else np.zeros((0, 6))
        )
        scores = _to_numpy(value["scores"]).astype(np.float32).reshape(-1)
        if _to_numpy(value["boxes"]).size and _to_numpy(value["boxes"]).shape[-1] != 6:
            raise HeadOutputError(head, name, f"boxes must be (N, 6), got {_to_numpy(value['boxes']).shape}")
        if len(boxes) != len(scores):
            raise HeadOutputError(head, name, f"{len(boxes)} boxes but {len(scores)} scores")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise HeadOutputError(head, name, "non-finite box coordinates or scores")
        if (boxes[:, 3:] < boxes[:, :3]).any():
            raise HeadOutputError(head, name, "a box has a maximum corner below its minimum corner")
        hi = np.asarray(image_shape, dtype=np.float64) - 0.5 + 1e-6
        if (boxes[:, :3] < -0.5 - 1e-6).any() or (boxes[:, 3:] > hi).any():
            raise HeadOutputError(head, name, f"a box lies outside the input image of shape {image_shape}")
        result: dict[str, Any] = {"boxes": boxes, "scores": scores}
        for key in ("labels", "queries"):
            if key in value:
                items = [str(v) for v in value[key]]
                if len(items) != len(boxes):
                    raise HeadOutputError(head, name, f"{len(boxes)} boxes but {len(items)} {key}")
                if key == "labels" and out.get("labels") and set(items) - set(out["labels"]):
                    raise HeadOutputError(head, name, f"undeclared labels {sorted(set(items) - set(out['labels']))}")
                result[key] = items
        return result

    arr = _to_numpy(value)
    if not np.issubdtype(arr.dtype, np.number):
        raise HeadOutputError(head, name, f"values must be numbers, got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise HeadOutputError(
            head, name, f"values must be finite numbers, got {int(np.size(arr) - np.isfinite(arr).sum())} NaN/Inf"
        )
    symbols = {"C": len(out.get("labels", []))}
    if kind == "mask":
        return _check_mask(head, out, arr, image_shape)
    _check_shape(head, out, arr, symbols)
    if kind == "scores" and arr.shape != (len(out["labels"]),):
        raise HeadOutputError(head, name, f"scores must be (C,) with C={len(out['labels'])}, got {arr.shape}")
    if "range" in out:
        lo, hi = out["range"]
        if arr.size and (arr.min() < lo - 1e-5 or arr.max() > hi + 1e-5):
            raise HeadOutputError(head, name, f"values outside the declared range [{lo}, {hi}]")
    if kind == "embedding" and out.get("normalized"):
        norm = float(np.linalg.norm(arr))
        if abs(norm - 1.0) > 1e-3:
            raise HeadOutputError(head, name, f"declared normalized but L2 norm is {norm:.4f}")
    return arr.astype(out["dtype"])
