"""Detection and grounding metrics against hand-computed values on tiny box sets."""

import numpy as np
import pytest

from engine.fitting.detection_metrics import DetectionCounter, GroundingCounter, greedy_match, inside_ellipsoid


def cube(x, y, z, s=10.0):
    return [x, y, z, x + s, y + s, z + s]


def test_greedy_match_gives_each_truth_to_the_highest_scoring_overlap_only():
    truth = np.array([cube(0, 0, 0)])
    # both overlap the lesion; the lower-scoring duplicate is a false positive
    pred = np.array([cube(0, 0, 1), cube(0, 0, 0)])
    order, tp = greedy_match(pred, np.array([0.9, 0.5]), truth, 0.3)
    assert order.tolist() == [0, 1] and tp.tolist() == [True, False]


def test_a_box_the_size_of_the_volume_finds_nothing():
    det = DetectionCounter()
    det.add(np.array([[0, 0, 0, 200, 200, 200]]), np.array([1.0]), np.array([cube(50, 50, 50)]))
    assert det.recall(0.3) == 0.0
    assert det.false_per_series(0.3) == 1.0
    assert det.mean_best_iou() == pytest.approx(1000 / 200**3)


def test_recall_false_boxes_and_best_iou_by_hand():
    det = DetectionCounter()
    # series 1: two lesions. A box shifted 5 mm along x on lesion A: IoU = 500 / 1500 = 1/3.
    # A box shifted 2 mm on lesion B: IoU = 800 / 1200 = 2/3. One far false box.
    det.add(
        np.array([cube(5, 0, 0), cube(102, 0, 0), cube(300, 300, 300)]),
        np.array([0.8, 0.6, 0.7]),
        np.array([cube(0, 0, 0), cube(100, 0, 0)]),
    )
    # series 2: lesion-free, one false box; series 3: lesion-free, no box
    det.add(np.array([cube(0, 0, 0)]), np.array([0.4]), np.zeros((0, 6)))
    det.add(np.zeros((0, 6)), np.zeros(0), np.zeros((0, 6)))
    assert det.recall(0.3) == 1.0
    assert det.recall(0.5) == 0.5  # only lesion B at 2/3
    assert det.false_per_series(0.3) == pytest.approx(2 / 3)
    assert det.false_per_series(0.5) == pytest.approx(1.0)
    assert det.mean_best_iou() == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert det.clean_fraction() == (0.5, 2)


def test_froc_and_ap_by_hand():
    det = DetectionCounter()
    # pooled by score: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP, 0.5 TP; 4 lesions, 2 series
    det.add(
        np.array([cube(0, 0, 0), cube(500, 0, 0), cube(100, 0, 0)]),
        np.array([0.9, 0.8, 0.5]),
        np.array([cube(0, 0, 0), cube(100, 0, 0)]),
    )
    det.add(
        np.array([cube(0, 0, 0), cube(500, 0, 0)]), np.array([0.7, 0.6]), np.array([cube(0, 0, 0), cube(200, 0, 0)])
    )
    # thresholds: (tp, fp) = (1,0) (1,1) (2,1) (2,2) (3,2); per series fp = 0, .5, .5, 1, 1
    froc = det.froc(0.3, (0.25, 0.5, 1.0, 2.0))
    assert froc == {0.25: 0.25, 0.5: 0.5, 1.0: 0.75, 2.0: 0.75}
    # precision envelope over recall steps .25, .5, .75: 1, 2/3, 3/5
    assert det.average_precision(0.3) == pytest.approx(0.25 * 1 + 0.25 * 2 / 3 + 0.25 * 3 / 5)


def test_tied_scores_enter_the_froc_curve_together():
    det = DetectionCounter()
    det.add(np.array([cube(500, 0, 0), cube(0, 0, 0)]), np.array([0.5, 0.5]), np.array([cube(0, 0, 0)]))
    # the tie cannot be split: recall 1 costs one false box
    assert det.froc(0.3, (0.5, 1.0)) == {0.5: 0.0, 1.0: 1.0}


def test_scores_must_match_boxes():
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        DetectionCounter().add(np.zeros((2, 6)), np.zeros(1), np.zeros((0, 6)))


def test_pointing_game_needs_the_centre_inside_the_lesion_not_its_box():
    axes = np.eye(3)
    sphere = lambda p: inside_ellipsoid(p, [0, 0, 0], [10, 10, 10], axes)  # noqa: E731
    g = GroundingCounter()
    truth = np.array([-10, -10, -10, 10, 10, 10.0])
    g.add(np.array([-9, -9, -9, 11, 11, 11.0]), truth, sphere)  # IoU 6859/9141 = 0.75, centre (1,1,1) inside
    g.add(np.array([0, 0, 0, 18, 18, 18.0]), truth, sphere)  # centre (9,9,9): in the box, outside the sphere
    g.add(None, truth, sphere)
    # second box: IoU 1000 / (8000 + 5832 - 1000) = 0.078, but it holds the lesion's centre
    assert g.hits[0.3] == [True, False, False] and g.hits[0.5] == [True, False, False]
    assert g.pointing == [True, False, False]
    assert g.centre_in_box == [True, True, False]


def test_inside_ellipsoid_follows_its_axes():
    r = np.sqrt(0.5)
    axes = np.array([[r, -r, 0], [r, r, 0], [0, 0, 1.0]])  # columns: long axis along (1, 1, 0)
    assert inside_ellipsoid([10, 10, 0], [0, 0, 0], [20, 2, 2], axes)
    assert not inside_ellipsoid([10, 0, 0], [0, 0, 0], [20, 2, 2], axes)


def test_evaluate_reports_detection_and_grounding_rows(tmp_path):
    """The shipped localize and ground heads through ``evaluate``: every new row is there, and the
    gameable centre-in-box rate is reported under its own name."""
    from engine.fitting.evaluation import evaluate
    from engine.synthetic import write_demo_archive

    write_demo_archive(tmp_path / "arch", studies=2, seed=5, formats=("explicit",))
    result = evaluate(tmp_path / "arch", heads=["localize", "ground"])
    rows = {(r["head"], r["metric"]): r for r in result["rows"]}
    want = {
        ("localize", m)
        for m in (
            "recall IoU>=0.3",
            "recall IoU>=0.5",
            "false boxes per series IoU<0.3",
            "AP IoU>=0.3",
            "mean best IoU",
            "FROC recall at 1 false/series IoU>=0.3",
            "centre-in-box rate (gameable)",
        )
    }
    want |= {("ground", m) for m in ("hit rate IoU>=0.3", "pointing game", "centre-in-box rate (gameable)")}
    assert want <= set(rows)
    assert ("localize", "hit rate") not in rows and ("ground", "hit rate") not in rows
    for key in want:
        value = rows[key]["value"]
        assert value is None or 0 <= value <= (rows[key]["n"] if "false" in key[1] else 1)
