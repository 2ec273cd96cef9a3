"""The layer pooling of the distribution statistics: what it concatenates, and a card whose
statistics do not match its pooling is refused."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.distribution import LAYER_POOLING, POOLING, load_distribution, pooled, pooled_dim


def test_layer_pooling_adds_token_spread_and_each_layer_by_index():
    rng = np.random.default_rng(0)
    cls, tokens = rng.normal(size=4), rng.normal(size=(10, 4))
    layers = {7: rng.normal(size=(10, 4)), 2: rng.normal(size=(10, 4))}
    assert np.allclose(pooled(cls, tokens), np.r_[cls, tokens.mean(0)])
    want = np.r_[
        cls, tokens.mean(0), tokens.std(0), layers[2].mean(0), layers[2].std(0), layers[7].mean(0), layers[7].std(0)
    ]
    got = pooled(cls, tokens, layers, LAYER_POOLING)
    assert np.allclose(got, want) and got.shape == (pooled_dim(4, 2, LAYER_POOLING),)
    assert pooled_dim(4, 2, POOLING) == 8


@pytest.mark.parametrize("pooling,dim,ok", [(LAYER_POOLING, 4 * 7, True), (LAYER_POOLING, 8, False), ("max", 8, False)])
def test_statistics_must_match_the_cards_pooling(tmp_path, pooling, dim, ok):
    save_file(
        {"mean": np.zeros(dim, np.float32), "precision": np.eye(dim, dtype=np.float32)}, str(tmp_path / "d.safetensors")
    )
    card = {
        "encoder": {"embed_dim": 4, "feature_layers": [1, 2]},
        "distribution": {"statistics": "d.safetensors", "pooling": pooling, "score": "mahalanobis", "threshold": 3.0},
    }
    if ok:
        stats = load_distribution(card, tmp_path)
        assert stats.pooling == LAYER_POOLING and stats.judge(np.ones(dim))["out_of_distribution"] is True
    else:
        with pytest.raises(ValueError):
            load_distribution(card, tmp_path)
