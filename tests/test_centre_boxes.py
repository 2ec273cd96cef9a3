"""Dense centre-map boxes: targets and decoding are inverses, and windows merge into one view."""

import numpy as np
import pytest
import torch

from engine.centre_boxes import centre_boxes, centre_targets
from engine.mapping import merge_window_boxes


@pytest.mark.parametrize(
    "box", [[10, 12, 14, 20, 22, 30.0], [-0.5, 3.2, 40.1, 6.5, 11.0, 47.3], [30.0, 30.0, 30.0, 33.0, 34.0, 35.0]]
)
def test_targets_decode_back_to_the_box(box):
    heat, size, off, mask = centre_targets(np.array([box]), (16, 16, 16), 4)
    assert mask.sum() == 1 and heat.max() == 1.0 and heat[mask][0] == 1.0
    boxes, scores = centre_boxes(torch.from_numpy(heat), torch.from_numpy(size), torch.from_numpy(off), 4, 0.5, 4)
    np.testing.assert_allclose(boxes, [box], atol=1e-4)
    assert scores.tolist() == [1.0]


def test_two_lesions_two_peaks_and_nothing_below_threshold():
    truth = np.array([[4, 4, 4, 12, 12, 12.0], [40, 40, 40, 52, 50, 48.0]])
    heat, size, off, _ = centre_targets(truth, (16, 16, 16), 4)
    prob = torch.from_numpy(heat) * torch.tensor([1.0])
    prob[10:, 10:, 10:] *= 0.4  # the second lesion's peak is weak
    got, scores = centre_boxes(prob, torch.from_numpy(size), torch.from_numpy(off), 4, 0.3, 8)
    np.testing.assert_allclose(got, truth, atol=1e-4)
    assert len(centre_boxes(prob, torch.from_numpy(size), torch.from_numpy(off), 4, 0.5, 8)[0]) == 1
    assert len(centre_boxes(torch.zeros(16, 16, 16), torch.from_numpy(size), torch.from_numpy(off), 4, 0.1, 8)[0]) == 0


def test_windows_merge_in_view_coordinates_one_box_per_lesion_and_query():
    windows = [(slice(0, 64), slice(0, 64), slice(0, 64)), (slice(48, 112), slice(0, 64), slice(0, 64))]
    lesion_a = {"boxes": np.array([[50, 10, 10, 60, 20, 20.0]]), "scores": np.array([0.9]), "labels": ["lesion"]}
    lesion_b = {
        "boxes": np.array([[2.5, 10, 10, 12, 20, 20.0], [30, 30, 30, 40, 40, 40.0]]),
        "scores": np.array([0.7, 0.6]),
        "labels": ["lesion", "lesion"],
    }
    merged = merge_window_boxes([lesion_a, lesion_b], windows)
    # the first box of window 2 is window 1's lesion seen again (IoU 0.86): dropped; the other is shifted by 48
    np.testing.assert_allclose(merged["boxes"], [[50, 10, 10, 60, 20, 20], [78, 30, 30, 88, 40, 40]])
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.6]) and merged["labels"] == ["lesion", "lesion"]
    q1 = {
        "boxes": np.array([[1, 1, 1, 5, 5, 5.0], [1, 1, 1, 5, 5, 5.0]]),
        "scores": np.array([0.2, 0.8]),
        "queries": ["a", "b"],
    }
    q2 = {
        "boxes": np.array([[1, 1, 1, 5, 5, 5.0], [1, 1, 1, 5, 5, 5.0]]),
        "scores": np.array([0.6, 0.1]),
        "queries": ["a", "b"],
    }
    merged = merge_window_boxes([q1, q2], windows)
    assert merged["queries"] == ["b", "a"] and merged["scores"].tolist() == pytest.approx([0.8, 0.6])
    np.testing.assert_allclose(merged["boxes"][1], [49, 1, 1, 53, 5, 5])  # query a's best box came from window 2
