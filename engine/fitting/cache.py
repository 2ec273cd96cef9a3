"""Frozen-encoder features, computed once per series and model and kept in a Zarr feature store.

Layout (Zarr v3)::

    features.zarr/<model key>/<series key>-<content digest>/
        attrs: series_uid, study_uid, native shape/affine, global view affine/shape/grid, complete
        cls (D,)  tokens (N, D)  layers (L, N, D)  joint (E,)           the global view
        tiles/layers (W, L, N, D)  tiles/image (W, X, Y, Z)  tiles/affine (W, 4, 4)   when asked for

The model key is derived from the model fingerprint, so a changed encoder, card or preprocessing
never reuses stale features; the series key carries a digest of the source files, so a changed
series is encoded again. ``complete`` is written last: an interrupted write is redone. Fits
that share the store encode a series under a file lock (``locks/``), so they never write one
series at once.
Refits read everything from here and never touch the encoder.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..enums import GLOBAL, VIEW_KINDS
from ..series_ref import sanitise_key


def default_cache_dir() -> Path:
    """``$MRFM_FEATURE_CACHE``, else ``<user cache>/mrfm/features``."""
    env = os.environ.get("MRFM_FEATURE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir  # heavy: loaded only by the code path that reads or writes that format

    return Path(user_cache_dir("mrfm")) / "features"


def model_key(fingerprint: str) -> str:
    return sanitise_key(fingerprint.split(":", 1)[-1])[:32]


def series_key(ref: Any) -> str:
    digest = hashlib.sha1("|".join(f"{s.label}:{s.digest}" for s in ref.sources).encode()).hexdigest()[:12]
    return sanitise_key(str(ref.key))[:80] + "-" + digest


@dataclass
class SeriesFeatures:
    """One series' cached features (numpy arrays; tiles only when they were requested)."""

    key: str
    series_uid: str
    study_uid: str
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    view_affine: np.ndarray
    view_shape: tuple[int, int, int]
    grid: tuple[int, int, int]
    feature_layers: list[int]
    cls: np.ndarray
    tokens: np.ndarray
    layers: np.ndarray
    joint: np.ndarray
    tile_layers: np.ndarray | None = None
    tile_images: np.ndarray | None = None
    tile_affines: np.ndarray | None = None

    def layer(self, index: int) -> np.ndarray:
        return self.layers[self.feature_layers.index(index)]


class FeatureCache:
    """Features of one model, read from or added to the feature store at ``root``.

    ``encoded`` counts the views sent through the encoder by this object (0 on a pure refit).
    """

    def __init__(
        self,
        model: Any,
        root: str | Path | None = None,
        *,
        backend: str = "torch",
        batch_size: int = 4,
        fingerprint: str | None = None,
    ):
        import zarr  # heavy: loaded only by the code path that reads or writes that format

        self.model = model
        self.fingerprint = fingerprint or model.fingerprint
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(str(self.root / "features.zarr"), mode="a").require_group(
            model_key(self.fingerprint)
        )
        if dict(self.group.attrs) != {"fingerprint": self.fingerprint, "model": model.name}:
            self.group.update_attributes({"fingerprint": self.fingerprint, "model": model.name})
        self.backend_name = backend
        self.batch_size = batch_size
        self._backend = None
        self.encoded = 0

    # --- encoding -------------------------------------------------------------------------------
    def _encode(self, images: torch.Tensor) -> list[Any]:
        if self._backend is None:
            if self.backend_name == "torch":
                self._backend = self.model  # eager fp32, the reference
            else:
                from engine.backends import select  # fitting reaches the run path only when it runs, never at import

                self._backend, _ = select(self.backend_name, self.model)
        feats = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            self.encoded += len(chunk)
            feats.extend(self._backend.encode(chunk))
        return feats

    def _compute(self, ref: Any, tiles: bool) -> dict[str, Any]:
        from engine.discover import load  # fitting reaches the run path only when it runs, never at import
        from engine.views import make_views  # fitting reaches the run path only when it runs, never at import

        volume = load(ref)
        kinds = VIEW_KINDS if tiles else (GLOBAL,)
        views = make_views(volume, self.model.preprocessing, kinds)
        g = views["global"]
        (f,) = self._encode(g.image[None])
        layers = self.model.feature_layers
        out: dict[str, Any] = {
            "attrs": {
                "series_uid": ref.series_uid,
                "study_uid": ref.study_uid,
                "native_shape": [int(s) for s in volume.shape[:3]],
                "native_affine": np.asarray(volume.affine).tolist(),
                "view_affine": np.asarray(g.affine).tolist(),
                "view_shape": list(g.shape),
                "grid": list(f.grid),
                "feature_layers": list(layers),
            },
            "cls": f.cls.numpy(),
            "tokens": f.tokens.numpy(),
            "layers": np.stack([f.layers[i].numpy() for i in layers]),
            "joint": f.joint.numpy(),
        }
        if tiles:
            t = views["tiles"]
            windows = t.windows or [t.full_window()]
            imgs = torch.stack([t.image[(slice(None), *w)] for w in windows])
            feats = self._encode(imgs)
            out["tiles/layers"] = np.stack([np.stack([ft.layers[i].numpy() for i in layers]) for ft in feats])
            out["tiles/image"] = imgs[:, 0].numpy()
            out["tiles/affine"] = np.stack([t.window_affine(w) for w in windows])
        return out

    # --- store ----------------------------------------------------------------------------------
    def _write(self, key: str, data: dict[str, Any]) -> None:
        if key in self.group:
            del self.group[key]
        g = self.group.require_group(key)
        for name, arr in data.items():
            if name == "attrs":
                continue
            parent, _, leaf = name.rpartition("/")
            target = g.require_group(parent) if parent else g
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            target.create_array(leaf, data=arr, chunks=arr.shape, overwrite=True)
        g.attrs.update(data["attrs"])
        g.attrs["tiles"] = "tiles/layers" in data
        g.attrs["complete"] = True  # last: an interrupted write is redone

    def _read(self, key: str, tiles: bool) -> SeriesFeatures | None:
        if key not in self.group:
            return None
        g = self.group[key]
        a = dict(g.attrs)
        if not a.get("complete") or (tiles and not a.get("tiles")):
            return None
        tile = {}
        if tiles:
            tile = {
                "tile_layers": g["tiles/layers"][...],
                "tile_images": g["tiles/image"][...],
                "tile_affines": g["tiles/affine"][...],
            }
        return SeriesFeatures(
            key=key,
            series_uid=a["series_uid"],
            study_uid=a["study_uid"],
            native_shape=tuple(a["native_shape"]),
            native_affine=np.asarray(a["native_affine"]),
            view_affine=np.asarray(a["view_affine"]),
            view_shape=tuple(a["view_shape"]),
            grid=tuple(a["grid"]),
            feature_layers=list(a["feature_layers"]),
            cls=g["cls"][...],
            tokens=g["tokens"][...],
            layers=g["layers"][...],
            joint=g["joint"][...],
            **tile,
        )

    def get(self, ref: Any, tiles: bool = False) -> SeriesFeatures:
        """The series' features, encoding it only when the store lacks them. Fits sharing the
        store take a lock per series to encode it: the second waits and reads the first's."""
        key = series_key(ref)
        found = self._read(key, tiles)
        if found is None:
            with self.lock(key):
                found = self._read(key, tiles)  # written while this one waited
                if found is None:
                    self._write(key, self._compute(ref, tiles))
                    found = self._read(key, tiles)
        return found  # type: ignore[return-value]

    def lock(self, key: str) -> Any:
        """The file lock that one series' features are written under."""
        from filelock import FileLock  # heavy: loaded only by the code path that reads or writes that format

        locks = self.root / "locks"
        locks.mkdir(exist_ok=True)
        return FileLock(str(locks / f"{model_key(self.fingerprint)}-{key}.lock"))

    def get_many(self, refs: list[Any], tiles: bool = False, log: Any = None) -> list[SeriesFeatures]:
        out = []
        for i, ref in enumerate(refs):
            out.append(self.get(ref, tiles))
            if log and (i + 1) % 10 == 0:
                log(f"features: {i + 1}/{len(refs)} series ({self.encoded} views encoded)")
        return out


def random_encoder_model(model: Any, seed: int = 0) -> Any:
    """The same architecture and preprocessing with seeded random weights: the floor every fitted
    head is compared with. Its fingerprint names the base model and the seed."""

    from engine.model import Model, build_encoder  # fitting reaches the run path only when it runs, never at import

    encoder = build_encoder(model.card)
    encoder.init_weights(torch.Generator().manual_seed(seed))
    encoder.eval().requires_grad_(False)
    fp = "sha256:" + hashlib.sha256(f"random-init:{seed}:{model.fingerprint}".encode()).hexdigest()
    return Model(model.folder, copy.deepcopy(model.card), encoder, fp)
