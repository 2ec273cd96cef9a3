"""Calibrated probabilities (temperature scaling, ECE, reliability) and the real set's independent
head mask, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest

from engine.fitting import metrics as M
from engine.fitting.real_set import dice, head_mask, otsu_threshold


def test_ece_and_reliability_by_hand():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.3, 0.7]])
    truth = np.array([0, 1, 0, 1])
    table = M.reliability(probs, truth)
    assert [(r["n"], r["accuracy"]) for r in table] == [(1, 1.0), (1, 1.0), (2, 0.5)]
    # bins: 0.6 -> [0.5,0.6] acc 1 ; 0.7 -> [0.6,0.7] acc 1 ; 0.95 x2 -> acc 0.5
    expected = (abs(1 - 0.6) + abs(1 - 0.7) + 2 * abs(0.5 - 0.95)) / 4
    assert M.ece(probs, truth) == pytest.approx(expected)


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece():
    rng = np.random.default_rng(0)
    n, c, true_t = 4000, 4, 3.0
    logits = rng.normal(0, 2.5, (n, c))
    p = np.exp(logits / true_t)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in p])
    t = M.fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.1)
    soft = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    assert M.ece(soft(logits / t), y) < M.ece(soft(logits), y) / 3


def test_otsu_matches_scikit_image_and_the_head_mask_fills_and_keeps_one_component():
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.normal(10, 3, 5000), rng.normal(100, 10, 3000)])
    assert otsu_threshold(data) == pytest.approx(filters.threshold_otsu(data, nbins=256), abs=0.5)
    vol = rng.normal(5, 1, (40, 40, 20))
    g = np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij"), -1)
    head = (((g - [20, 20, 10]) / [14, 14, 8]) ** 2).sum(-1) <= 1
    vol[head] = 100
    vol[(((g - [20, 20, 10]) / [5, 5, 3]) ** 2).sum(-1) <= 1] = 5  # a dark ventricle inside
    vol[2:4, 2:4, 2:4] = 100  # a bright speck outside the head
    mask = head_mask(vol)
    assert dice(mask, head) > 0.99 and not mask[2:4, 2:4, 2:4].any()


def test_the_real_set_lists_what_it_found_and_what_is_missing(tmp_path):
    import json
    from pathlib import Path

    from engine.fitting.real_set import SET_FILE, build_real_set

    bare = build_real_set(tmp_path / "none")
    assert {"dcm_qa_ts", "dcm_qa_enh", "MNI152 (nilearn wheel)", "Colin27 (mricron-data)"} <= set(bare["missing"])
    here = Path(__file__).resolve()
    shared = next(
        (p / "shared" / "data" for p in (here.parents[2], here.parents[3]) if (p / "shared" / "data").is_dir()),
        here.parents[2] / "shared" / "data",
    )
    if not (shared / "dcm_qa_ts").is_dir():
        pytest.skip(f"dcm2niix's validation sets are not at {shared}")
    found = build_real_set(tmp_path / "real", shared=shared)
    sources = [e["source"] for e in found["series"]]
    assert any("dcm_qa_ts" in s for s in sources) and any("dcm_qa_enh" in s for s in sources)
    assert all(e["region"] == "brain" and e["healthy"] for e in found["series"])
    assert json.loads((tmp_path / "real" / SET_FILE).read_text()) == found
