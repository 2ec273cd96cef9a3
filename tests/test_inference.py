"""Inference shares work between heads and gives each head only what it declares."""

import numpy as np
import pytest
import torch

import engine
from engine.features import Features
from engine.geometry import Volume
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


class CountingBackend:
    name = "counting"

    def __init__(self):
        self.images = 0
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        self.images += images.shape[0]
        return [
            Features(
                cls=torch.ones(8),
                tokens=torch.ones(512, 8),
                layers={1: torch.ones(512, 8), 3: torch.ones(512, 8)},
                grid=(8, 8, 8),
                joint=torch.ones(4) / 2,
            )
            for _ in range(images.shape[0])
        ]


def recording_head(view, features, image=False):
    seen = []

    class Recorder(engine.Head):
        spec_ = {
            "name": f"rec-{view}",
            "version": "1",
            "encoder": {"fingerprint": "any"},
            "inputs": {"view": view, "image": image, "features": features},
            "outputs": [{"name": "v", "kind": "value", "dtype": "float32", "shape": [], "units": "1"}],
        }

        def predict(self, batch):
            seen.append(batch)
            return [{"v": 1.0} for _ in batch]

    head = Recorder(Recorder.spec_, {}, None)
    return head, seen


def prepared(key, shape):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    volume = Volume(np.random.default_rng(0).random(shape, dtype=np.float32), affine)
    return Prepared(key, shape, affine, {}, make_views(volume, PRE))


def test_each_view_window_is_encoded_once_and_shared_by_every_head():
    backend = CountingBackend()
    a, seen_a = recording_head("global", ["cls"])
    b, seen_b = recording_head("global", ["tokens", "layers[3]"], image=True)
    batch = [prepared("s1", (60, 60, 30)), prepared("s2", (200, 60, 30))]  # s2 needs several tiles
    n_windows = sum(len(p.views["tiles"].windows) for p in batch)
    assert n_windows > 2
    Inference(backend, {"a": a, "b": b}, None, batch_size=4).run(batch)
    assert backend.images == 2 + n_windows  # one global view per series plus every tile window, once
    items_a = [i for chunk in seen_a for i in chunk]
    items_b = [i for chunk in seen_b for i in chunk]
    assert [i.series_key for i in items_a] == ["s1", "s2"] and len(items_b) == 2


def test_a_head_sees_only_what_its_manifest_declares():
    backend = CountingBackend()
    a, seen_a = recording_head("global", ["cls"])
    b, seen_b = recording_head("global", ["tokens", "layers[3]"], image=True)
    Inference(backend, {"a": a, "b": b}, None).run([prepared("s1", (60, 60, 30))])
    item_a, item_b = seen_a[0][0], seen_b[0][0]
    assert item_a.features.cls is not None and item_a.features.tokens is None and item_a.features.layers == {}
    assert item_a.image is None and item_a.shape == (64, 64, 64) and item_a.text is None
    assert item_b.features.cls is None and set(item_b.features.layers) == {3} and item_b.image is not None


def test_heads_get_batches_of_series():
    backend = CountingBackend()
    a, seen = recording_head("global", ["cls"])
    Inference(backend, {"a": a}, None, batch_size=3).run([prepared(f"s{i}", (40, 40, 20)) for i in range(5)])
    assert [len(chunk) for chunk in seen] == [3, 2]


def test_a_head_fit_on_another_encoder_is_refused_when_named_and_skipped_otherwise(monkeypatch):
    import torch

    import contrib_heads.classify as classify
    from engine.errors import UsageError
    from engine.inference import load_heads
    from engine.model import load_model

    model = load_model()
    real = classify.ClassifyHead.manifest

    def other_encoder(cls):
        spec = real()
        return {**spec, "encoder": {**spec["encoder"], "fingerprint": "sha256:" + "0" * 64}}

    monkeypatch.setattr(classify.ClassifyHead, "manifest", classmethod(other_encoder))
    with pytest.raises(UsageError, match="was fit on encoder sha256:0000.*--force"):
        load_heads(["classify"], model, torch.device("cpu"), {}, None)
    heads, warnings = load_heads(None, model, torch.device("cpu"), {}, None)
    assert "classify" not in heads and any("classify" in w and "skipped" in w for w in warnings)
    heads, warnings = load_heads(["classify"], model, torch.device("cpu"), {}, None, force=True)
    assert "classify" in heads and any("--force" in w for w in warnings)
