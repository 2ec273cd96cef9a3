"""Every head output is checked against its declaration before it is written."""

import numpy as np
import pytest
import torch

from engine.heads import HeadOutputError, check_output, mask_mode, stored_declaration

SHAPE = (64, 64, 64)
SCORES = {
    "name": "region",
    "kind": "scores",
    "dtype": "float32",
    "shape": ["C"],
    "labels": ["a", "b", "c"],
    "range": [0, 1],
}
MASK = {"name": "labels", "kind": "mask", "dtype": "uint8", "labels": ["background", "thing"]}
BOXES = {"name": "lesions", "kind": "boxes", "dtype": "float32", "labels": ["lesion"]}
EMB = {"name": "embedding", "kind": "embedding", "dtype": "float32", "shape": [4], "normalized": True}
VALUE = {"name": "volume", "kind": "value", "dtype": "float32", "shape": [], "units": "mL", "range": [0, 1000]}


def test_valid_outputs_pass_and_come_back_as_numpy():
    assert check_output("h", SCORES, torch.tensor([0.2, 0.3, 0.5]), SHAPE).dtype == np.float32
    probs = np.zeros((2, *SHAPE), np.float32)
    probs[0] = 1
    assert check_output("h", MASK, probs, SHAPE).shape == (2, *SHAPE)
    boxes = check_output("h", BOXES, {"boxes": [[1, 2, 3, 10, 20, 30]], "scores": [0.9], "labels": ["lesion"]}, SHAPE)
    assert boxes["boxes"].shape == (1, 6) and boxes["labels"] == ["lesion"]
    empty = check_output("h", BOXES, {"boxes": np.zeros((0, 6)), "scores": np.zeros(0)}, SHAPE)
    assert empty["boxes"].shape == (0, 6)
    assert check_output("h", EMB, np.array([0.5, 0.5, 0.5, 0.5]), SHAPE).shape == (4,)
    assert check_output("h", VALUE, np.float32(12.5), SHAPE).shape == ()


@pytest.mark.parametrize(
    "decl, value, reason",
    [
        (SCORES, [0.5, 0.5], "expected C=3"),
        (SCORES, [0.2, 0.3, 1.5], "outside the declared range"),
        (SCORES, [0.2, float("nan"), 0.5], "finite"),
        (MASK, np.zeros((3, *SHAPE)), "must be \\(C, X, Y, Z\\)"),
        (MASK, np.full((2, *SHAPE), 2.0), "lie in \\[0, 1\\]"),
        (BOXES, {"boxes": [[1, 2, 3, 0, 20, 30]], "scores": [0.9]}, "maximum corner below"),
        (BOXES, {"boxes": [[1, 2, 3, 10, 20, 90]], "scores": [0.9]}, "outside the input image"),
        (BOXES, {"boxes": [[1, 2, 3, 10, 20, 30]], "scores": [0.9, 0.1]}, "1 boxes but 2 scores"),
        (BOXES, {"boxes": [[1, 2, 3, 10, 20, 30]], "scores": [0.9], "labels": ["tumour"]}, "undeclared labels"),
        (BOXES, [[1, 2, 3, 10, 20, 30]], "must be a dict"),
        (EMB, [1.0, 1.0, 0.0, 0.0], "L2 norm"),
        (EMB, [1.0, 0.0, 0.0], "expected shape"),
        (VALUE, [1.0, 2.0], "dimensions"),
    ],
)
def test_outputs_breaking_their_declaration_are_rejected_with_the_reason(decl, value, reason):
    with pytest.raises(HeadOutputError, match=reason) as info:
        check_output("myhead", decl, value, SHAPE)
    assert info.value.head == "myhead" and info.value.output == decl["name"]


FG = {"name": "tumour", "kind": "mask", "dtype": "uint8", "labels": ["tumour"]}
MULTI = {
    "name": "tissues",
    "kind": "mask",
    "dtype": "uint8",
    "labels": ["a", "b", "c"],
    "multilabel": True,
    "threshold": 0.3,
}


def test_mask_modes_follow_the_declaration_and_old_manifests_keep_softmax():
    assert mask_mode("h", MASK) == ("softmax", 0.5)
    assert mask_mode("h", FG) == ("sigmoid", 0.5)
    assert mask_mode("h", {**FG, "threshold": 0.7}) == ("sigmoid", 0.7)
    assert mask_mode("h", MULTI) == ("multilabel", 0.3)
    with pytest.raises(HeadOutputError, match="softmax mask needs two or more"):
        mask_mode("h", {**FG, "activation": "softmax"})
    with pytest.raises(HeadOutputError, match="must declare multilabel"):
        mask_mode("h", {**MASK, "activation": "sigmoid"})


def test_one_channel_masks_are_stored_with_a_background_label():
    assert check_output("h", FG, np.full((1, *SHAPE), 0.9, np.float32), SHAPE).shape == (1, *SHAPE)
    stored = stored_declaration("h", FG)
    assert (
        stored["labels"] == ["background", "tumour"]
        and stored["activation"] == "sigmoid"
        and stored["threshold"] == 0.5
    )
    assert stored_declaration("h", MASK)["labels"] == MASK["labels"]
    assert stored_declaration("h", MULTI)["labels"] == ["a", "b", "c"]


@pytest.mark.parametrize("decl, shape", [(FG, (2, *SHAPE)), (FG, SHAPE), (MULTI, (2, *SHAPE)), (MASK, (1, *SHAPE))])
def test_mask_channel_counts_must_match_the_declared_labels(decl, shape):
    with pytest.raises(
        HeadOutputError, match=rf"= \({len(decl['labels'])}, 64, 64, 64\).*got \({', '.join(map(str, shape))}\)"
    ) as info:
        check_output("myhead", decl, np.zeros(shape, np.float32), SHAPE)
    assert info.value.head == "myhead" and info.value.output == decl["name"]
