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
    valid: torch.Tensor | None = None  # (1, X, Y, Z) bool: voxel centre inside the series' field of view
    intensity: dict[str, Any] = field(default_factory=dict)  # clip_percentiles, normalize, padding_value

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def window_affine(self, window: tuple[slice, slice, slice]) -> np.ndarray:
        """Affine of one window: the view's affine shifted to the window's origin."""
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in window]
        return self.affine @ shift

    def full_window(self) -> tuple[slice, slice, slice]:
        return tuple(slice(0, n) for n in self.shape)  # type: ignore[return-value]

    def info(self, window: tuple[slice, slice, slice] | None = None) -> ViewInfo:
        """What a head may know about the image it sees: this view, or one window of it."""
        window = window or self.full_window()
        affine = self.window_affine(window)
        sizes = np.linalg.norm(affine[:3, :3], axis=0)
        directions = affine[:3, :3] / sizes
        clip = self.intensity.get("clip_percentiles", (0.5, 99.5))
        return ViewInfo(
            kind=self.kind,
            shape=tuple(s.stop - s.start for s in window),  # type: ignore[arg-type]
            view_shape=self.shape,
            origin=tuple(int(s.start) for s in window),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in sizes),  # type: ignore[arg-type]
            directions=tuple(tuple(float(v) for v in directions[:, a]) for a in range(3)),  # type: ignore[arg-type,misc]
            world_origin=tuple(float(v) for v in affine[:3, 3]),  # type: ignore[arg-type]
            clip_percentiles=(float(clip[0]), float(clip[1])),
            normalize=str(self.intensity.get("normalize", "zscore")),
            padding_value=float(self.intensity.get("padding_value", 0.0)),
        )


@dataclass(frozen=True)
class ViewInfo:
    """How the image a head sees was made, so a head can reason about it without an affine.

    Axes: array axis ``a`` points along the unit RAS+ vector ``directions[a]`` (views are
    axis-aligned RAS grids: axis 0 toward +x = patient right, 1 toward +y = anterior, 2 toward
    +z = superior), one voxel is ``spacing[a]`` mm, and the centre of voxel (0, 0, 0) of the image
    lies at ``world_origin`` (RAS+ mm). Voxel centres sit at integer coordinates.

    Intensities: the series' voxels were clipped to ``clip_percentiles`` and rescaled to [0, 1],
    then (``normalize == "zscore"``) standardised with the mean and standard deviation of the
    series' own voxels. Padding outside the acquired field of view holds ``padding_value`` (the
    clipped background after the same transform); ``HeadInput.valid`` tells real data from it.

    Tiles: the head sees one ``shape`` window whose first voxel is ``origin`` in the tiled view
    grid of ``view_shape``; for the global view ``origin`` is (0, 0, 0) and ``shape == view_shape``.
    """

    kind: str  # "global" or "tiles"
    shape: tuple[int, int, int]
    view_shape: tuple[int, int, int]
    origin: tuple[int, int, int]
    spacing: tuple[float, float, float]
    directions: tuple[tuple[float, float, float], ...]
    world_origin: tuple[float, float, float]
    clip_percentiles: tuple[float, float]
    normalize: str  # "zscore" or "none"
    padding_value: float

    @property
    def axis_codes(self) -> str:
        """nibabel-style codes of the array axes, e.g. 'RAS'."""
        codes = (("L", "R"), ("P", "A"), ("I", "S"))
        out = []
        for d in self.directions:
            w = int(np.argmax(np.abs(d)))
            out.append(codes[w][d[w] > 0])
        return "".join(out)

    def to_world(self, ijk: Any) -> np.ndarray:
        """Continuous voxel coordinates (N, 3) of the head's image -> RAS+ mm (N, 3)."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        axes = np.asarray(self.directions).T * np.asarray(self.spacing)
        return ijk @ axes.T + np.asarray(self.world_origin)


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
    ``valid`` and ``view_info`` always come (the engine fills them; None only when a caller
    builds a HeadInput by hand): ``valid`` is True where a voxel's centre lies inside the
    series' acquired field of view and False on padding, so ``image[valid]`` is the real data;
    ``view_info`` describes the axes, spacing, intensity transform and window origin.

    Coordinates: continuous voxel coordinates of this image, voxel centres at integers, so voxel
    ``i`` spans ``[i - 0.5, i + 0.5]`` along its axis and the whole image spans
    ``[-0.5, n - 0.5]``. A box is ``(i0, j0, k0, i1, j1, k1)`` with ``i0 <= i1`` etc.; the box
    holding exactly voxels 2..5 along axis 0 has ``i0 = 1.5, i1 = 5.5``.
    """

    series_key: str
    image: torch.Tensor | None  # (1, X, Y, Z), the view or window the features were computed from
    features: Features
    text: TextFeatures | None = None
    image_shape: tuple[int, int, int] | None = None
    valid: torch.Tensor | None = None  # (1, X, Y, Z) bool, same grid as image
    view_info: ViewInfo | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the view or window, in voxels (box coordinates refer to it)."""
        if self.image_shape is not None:
            return self.image_shape
        if self.view_info is not None:
            return self.view_info.shape
        assert self.image is not None, "HeadInput needs an image or an image_shape"
        return tuple(int(s) for s in self.image.shape[-3:])  # type: ignore[return-value]
