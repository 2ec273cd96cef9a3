"""The six built-in heads: manifests, weights, output contracts and their post-processing."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import engine
from engine.heads import check_output, load_weights
from engine.plugins import DEFAULT_PLUGINS
from engine.schemas import errors as schema_errors

HEADS = ("classify", "regress", "segment", "localize", "ground", "retrieve")
GRID = (8, 8, 8)
IMAGE = (64, 64, 64)
EMBED, JOINT = 128, 64


def head_class(name: str) -> type[engine.Head]:
    registered: list[type] = []
    importlib.import_module(f"contrib_heads.{name}").register_heads(register=registered.append)
    (cls,) = registered
    return cls


def context(**params) -> engine.HeadContext:
    return engine.HeadContext(
        device=torch.device("cpu"),
        embed_dim=EMBED,
        grid=GRID,
        input_size=IMAGE,
        model_fingerprint="sha256:" + "0" * 64,
        params=params,
    )


def make_head(name: str, **params) -> engine.Head:
    cls = head_class(name)
    return cls(cls.manifest(), load_weights(cls), context(**params))


def random_item(seed: int, key: str = "s", queries: tuple[str, ...] = ("lesion", "ventricles")) -> engine.HeadInput:
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(GRID))
    features = engine.Features(
        cls=torch.randn(EMBED, generator=g),
        tokens=torch.randn(n, EMBED, generator=g),
        layers={i: torch.randn(n, EMBED, generator=g) for i in (1, 3, 5)},
        grid=GRID,
        joint=F.normalize(torch.randn(JOINT, generator=g), dim=0),
    )
    text = (
        engine.TextFeatures(list(queries), F.normalize(torch.randn(len(queries), JOINT, generator=g), dim=-1))
        if queries
        else None
    )
    return engine.HeadInput(series_key=key, image=torch.randn(1, *IMAGE, generator=g), features=features, text=text)


@pytest.fixture(scope="module")
def batch() -> list[engine.HeadInput]:
    return [random_item(1, "a"), random_item(2, "b")]


@pytest.mark.parametrize("name", HEADS)
def test_manifest_validates_and_names_the_package(name):
    cls = head_class(name)
    manifest = cls.manifest()
    assert schema_errors("head", manifest) == []
    assert manifest["name"] == name
    assert f"contrib_heads.{name}" in DEFAULT_PLUGINS


@pytest.mark.parametrize("name", HEADS)
def test_register_heads_registers_exactly_one_head_class(name):
    registered: list[type] = []
    importlib.import_module(f"contrib_heads.{name}").register_heads(register=registered.append)
    assert len(registered) == 1 and issubclass(registered[0], engine.Head)


@pytest.mark.parametrize("name", HEADS)
def test_batch_outputs_pass_their_declarations(name, batch):
    head = make_head(name)
    results = head.predict(batch)
    assert len(results) == len(batch)
    declared = {out["name"]: out for out in head.manifest()["outputs"]}
    for item, result in zip(batch, results):
        assert set(result) == set(declared)
        for out_name, value in result.items():
            check_output(name, declared[out_name], value, tuple(item.image.shape[1:]))


def test_batched_prediction_equals_one_by_one(batch):
    head = make_head("classify")
    together = head.predict(batch)
    alone = [head.predict([item])[0] for item in batch]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a["region"], b["region"], atol=1e-6)


@pytest.mark.parametrize("name", [n for n in HEADS if n != "retrieve"])
def test_weights_are_seeded_and_match_the_module(name):
    from contrib_heads.init_weights import init_state

    first, again, other = init_state(name, 0), init_state(name, 0), init_state(name, 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    shipped = load_weights(head_class(name))
    assert {k: tuple(v.shape) for k, v in shipped.items()} == {k: tuple(v.shape) for k, v in first.items()}


def test_heads_refuse_an_encoder_of_another_width():
    cls = head_class("classify")
    ctx = context()
    ctx.embed_dim = 256
    with pytest.raises(ValueError, match="embed_dim"):
        cls(cls.manifest(), load_weights(cls), ctx)


def test_classify_gives_probability_distributions(batch):
    for result in make_head("classify").predict(batch):
        for name in ("region", "contrast"):
            assert result[name].shape == (4,)
            assert result[name].sum() == pytest.approx(1.0, abs=1e-5)


def test_regress_volume_is_a_non_negative_scalar(batch):
    for result in make_head("regress").predict(batch):
        assert np.asarray(result["lesion_volume"]).shape == () and result["lesion_volume"] >= 0


def test_segment_probabilities_sum_to_one_over_labels(batch):
    results = make_head("segment").predict(batch)
    for result in results:
        probs = result["anatomy"]
        assert probs.shape == (5, *IMAGE)
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert not np.allclose(results[0]["anatomy"], results[1]["anatomy"])


def test_segment_token_grid_inverts_a_conv3d_patch_embedding():
    from contrib_heads.segment import token_grid

    conv = torch.nn.Conv3d(1, 4, 8, stride=8)
    grid_map = conv(torch.randn(2, 1, 64, 48, 32))  # (2, 4, 8, 6, 4)
    tokens = grid_map.flatten(2).transpose(1, 2)
    assert torch.equal(token_grid(tokens, (8, 6, 4)), grid_map)


def test_retrieve_returns_the_unit_joint_embedding(batch):
    assert head_class("retrieve").weights_path() is None
    for item, result in zip(batch, make_head("retrieve").predict(batch)):
        np.testing.assert_allclose(result["embedding"], item.features.joint.numpy(), atol=1e-6)
        assert np.linalg.norm(result["embedding"]) == pytest.approx(1.0, abs=1e-6)


# ---- localize -------------------------------------------------------------------------------


def test_nms3d_drops_boxes_overlapping_a_better_one():
    from engine.token_boxes import box_iou3d, nms3d

    boxes = np.array(
        [
            [0, 0, 0, 10, 10, 10],  # A
            [1, 1, 1, 11, 11, 11],  # overlaps A with IoU 729/1271 = 0.57
            [20, 20, 20, 30, 30, 30],  # apart
            [0, 0, 0, 10, 10, 20],  # contains A: IoU 0.5
            [5, 0, 0, 15, 10, 10],  # half-overlaps A: IoU 1/3
        ],
        dtype=float,
    )
    scores = np.array([0.9, 0.95, 0.3, 0.5, 0.8])
    assert box_iou3d(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(729 / 1271)
    assert nms3d(boxes, scores, 0.3).tolist() == [1, 2]  # 1 beats 0, 4 (IoU(1,4)=0.33...), 3
    assert nms3d(boxes, scores, 0.55).tolist() == [1, 4, 3, 2]
    assert nms3d(boxes, scores, 1.0).tolist() == [1, 0, 4, 3, 2]
    assert nms3d(np.zeros((0, 6)), np.zeros(0), 0.5).tolist() == []


def test_basins_split_touching_peaks_and_box_them_in_voxels():
    from engine.token_boxes import basin_boxes

    prob = np.zeros(GRID)
    prob[2, 2, 2], prob[2, 2, 3] = 0.9, 0.6  # one lesion over two tokens
    prob[5, 5, 5], prob[5, 5, 6], prob[5, 5, 7] = 0.8, 0.55, 0.7  # two peaks joined by a saddle
    boxes, scores = basin_boxes(prob, 0.5, IMAGE)
    order = np.argsort(-scores)
    np.testing.assert_allclose(scores[order], [0.9, 0.8, 0.7])
    np.testing.assert_allclose(boxes[order[0]], [15.5, 15.5, 15.5, 23.5, 23.5, 31.5])
    # the saddle token climbs to its higher neighbour, (5, 5, 5)
    np.testing.assert_allclose(boxes[order[1]], [39.5, 39.5, 39.5, 47.5, 47.5, 55.5])
    np.testing.assert_allclose(boxes[order[2]], [39.5, 39.5, 55.5, 47.5, 47.5, 63.5])


def _fake_net(centres: dict[int, tuple[int, int, int]], log_size: float = np.log(8.0)):
    """A stand-in CentreNet: a centre peak at the given output cell per batch item, offsets 0.5."""

    def net(layers, image, text=None):
        b = image.shape[0]
        out = tuple(n // 4 for n in image.shape[2:])
        heat = torch.full((b, *out), -10.0)
        for i, cell in centres.items():
            heat[i, cell[0], cell[1], cell[2]] = 5.0
        return heat, torch.full((b, 3, *out), log_size), torch.full((b, 3, *out), 0.5)

    return net


def test_localize_reads_boxes_at_centre_peaks_in_window_voxels(batch):
    head = make_head("localize", threshold=0.5)
    head.net = _fake_net({0: (1, 6, 3)})
    first, second = head.predict(batch)
    # cell c spans voxels 4c .. 4c + 3; offset 0.5 puts the centre at 4c + 1.5; size 8 voxels
    centre = np.array([1, 6, 3]) * 4 + 1.5
    np.testing.assert_allclose(first["lesions"]["boxes"], [np.concatenate([centre - 4, centre + 4])])
    assert first["lesions"]["labels"] == ["lesion"] and 0.99 < first["lesions"]["scores"][0] <= 1
    assert len(second["lesions"]["boxes"]) == 0  # no peak above the threshold: no box


def test_localize_clips_boxes_to_the_window_it_saw(batch):
    head = make_head("localize", threshold=0.5)
    head.net = _fake_net({0: (0, 15, 7)}, log_size=np.log(40.0))
    (first, _) = head.predict(batch)
    box = check_output("localize", head.manifest()["outputs"][0], first["lesions"], IMAGE)["boxes"][0]
    assert box[0] == -0.5 and box[4] == 63.5


# ---- ground ---------------------------------------------------------------------------------


def test_ground_gives_one_box_per_query_and_labels_weak_ones_not_found():
    head = make_head("ground", threshold=0.5)
    item = random_item(3, queries=("first", "second"))
    trunk = head.net.trunk
    out = tuple(n // 4 for n in IMAGE)

    def decode(x, text):  # the first query peaks strongly at cell (1, 2, 3), the second weakly at (6, 0, 7)
        first = bool(torch.equal(text[0], item.text.embeddings[0]))
        heat = torch.full((1, *out), -10.0)
        heat[(0, 1, 2, 3) if first else (0, 6, 0, 7)] = 5.0 if first else -1.0
        return heat, torch.full((1, 3, *out), np.log(2.0)), torch.full((1, 3, *out), 0.5)  # small: no clipping

    head.net = type("Net", (), {"trunk": staticmethod(trunk), "decode": staticmethod(decode)})()
    (result,) = head.predict([item])
    regions = check_output("ground", head.manifest()["outputs"][0], result["regions"], IMAGE)
    assert regions["queries"] == ["first", "second"] and regions["labels"] == ["found", "not found"]
    for box, cell in zip(regions["boxes"], [(1, 2, 3), (6, 0, 7)]):
        np.testing.assert_allclose((box[:3] + box[3:]) / 2, np.array(cell) * 4 + 1.5)


def test_ground_without_queries_returns_no_boxes():
    (result,) = make_head("ground").predict([random_item(4, queries=())])
    assert len(result["regions"]["boxes"]) == 0 and result["regions"]["queries"] == []
