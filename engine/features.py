"""What the encoder produces and what heads receive.

Heads see view-space data only: an image tensor and the encoder features computed from it.
They never see affines; the engine maps their outputs back to the native grid and world mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class View:
    """A preprocessed copy of a series fed to the encoder, with its own voxel-to-RAS affine.

    ``kind`` is ``global`` (the whole field of view fitted into the encoder input) or ``tiles``
    (the series at the model's spacing, covered by encoder-sized windows listed in ``windows``).
    """

    kind: str
    image: torch.Tensor  # (1, X, Y, Z) float32
    affine: np.ndarray
    windows: list[tuple[slice, slice, slice]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def window_affine(self, window: tuple[slice, slice, slice]) -> np.ndarray:
        """Affine of one window: the view's affine shifted to the window's origin."""
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in window]
        return self.affine @ shift


@dataclass
class Features:
    """Encoder outputs for one image. Token tensors are (N, D) over a token ``grid``."""

    cls: torch.Tensor  # (D,)
    tokens: torch.Tensor  # (N, D)
    layers: dict[int, torch.Tensor]  # layer index -> (N, D)
    grid: tuple[int, int, int]
    joint: torch.Tensor | None = None  # (E,) L2-normalised image embedding in the joint space

    def get(self, name: str) -> Any:
        """Look a declared feature up by its manifest name: cls, tokens, joint or layers[n]."""
        if name.startswith("layers[") and name.endswith("]"):
            return self.layers[int(name[7:-1])]
        return getattr(self, name)

    def only(self, declared: list[str]) -> Features:
        """A copy holding just the declared features; the rest are None (layers: left out)."""
        keep = set(declared)
        layers = {i: t for i, t in self.layers.items() if f"layers[{i}]" in keep}
        missing = {n for n in keep if n.startswith("layers[")} - {f"layers[{i}]" for i in layers}
        if missing:
            raise KeyError(f"the encoder does not export {sorted(missing)}; it exports layers {sorted(self.layers)}")
        return Features(
            cls=self.cls if "cls" in keep else None,  # type: ignore[arg-type]
            tokens=self.tokens if "tokens" in keep else None,  # type: ignore[arg-type]
            layers=layers,
            grid=self.grid,
            joint=self.joint if "joint" in keep else None,
        )


@dataclass
class TextFeatures:
    """Text queries encoded once per run, in the joint image-text space."""

    queries: list[str]
    embeddings: torch.Tensor  # (Q, E), L2-normalised


@dataclass
class HeadInput:
    """One item of a head batch: a series' view (or one tile of it) and its features.

    A head receives only what its manifest declares: ``image`` is None unless it declares
    ``"image": true``, ``text`` is None unless it reads ``text``, undeclared features are None.
    """

    series_key: str
    image: torch.Tensor | None  # (1, X, Y, Z), the view or window the features were computed from
    features: Features
    text: TextFeatures | None = None
    image_shape: tuple[int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the view or window, in voxels (box coordinates refer to it)."""
        if self.image_shape is not None:
            return self.image_shape
        assert self.image is not None, "HeadInput needs an image or an image_shape"
        return tuple(int(s) for s in self.image.shape[-3:])  # type: ignore[return-value]
