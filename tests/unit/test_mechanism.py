"""The mechanism metrics (labels per image, co-occurrence, label pairs) and the threshold check of
fastmlgan.metrics against hand arithmetic and direct recomputation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastmlgan.errors import ConfigError
from fastmlgan.metrics import (
    PRF_KEYS,
    THRESHOLD_GRID,
    compute_metrics,
    mechanism_metrics,
    metrics_at_thresholds,
    tune_thresholds,
)

# The hand example of tests/unit/test_metrics.py: 4 images x 3 classes.
TARGETS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
SCORES = np.array([[0.9, 0.2, 0.6], [0.3, 0.8, 0.7], [0.6, 0.4, 0.1], [0.1, 0.55, 0.95]])


def test_mechanism_hand_example():
    m = mechanism_metrics(SCORES, TARGETS)
    # predicted {0,2} {1,2} {0} {1,2}: 7/4 labels per image; true {0,2} {1} {0,1} {2}: 6/4.
    assert m["avg_labels"] == pytest.approx(7 / 4)
    assert m["true_labels"] == pytest.approx(6 / 4)
    assert m["labels_gap"] == pytest.approx(1 / 4)
    # As compute_metrics: sqrt(2 (1/16 + 1/4)).
    assert m["cooc_dist"] == pytest.approx(math.sqrt(0.625))
    assert m["cooc_dist"] == pytest.approx(compute_metrics(SCORES, TARGETS)["cooc_dist"])
    # Unit-mass matrices. True pairs (0,1) 1/4, (0,2) 1/4: the symmetric matrix sums to 1.
    # Predicted (0,2) 1/4, (1,2) 2/4: sums to 3/2, so Q̂ = (0,2) 1/6, (1,2) 1/3.
    # Differences -1/4, -1/12, +1/3, twice each: sqrt(2 (9 + 1 + 16) / 144) = sqrt(13/36).
    assert m["cooc_dist_pairs"] == pytest.approx(math.sqrt(13 / 36))
    # True pairs: image 0 {0,2}, image 2 {0,1}; predicted: image 0 {0,2}, image 1 {1,2}, image 3
    # {1,2}. Shared: image 0's only. Recall 1/2, precision 1/3.
    assert m["pair_recall"] == pytest.approx(50.0)
    assert m["pair_precision"] == pytest.approx(100 / 3)


def test_mechanism_per_class_thresholds_and_edge_cases():
    # Class 2 at 0.65: its 0.6 of image 0 drops out; predicted {0} {1,2} {0} {1,2}.
    m = mechanism_metrics(SCORES, TARGETS, [0.5, 0.5, 0.65])
    assert m["avg_labels"] == pytest.approx(6 / 4)
    # Predicted pairs: images 1 and 3, (1,2) at 2/4; none shared with the truth.
    assert (m["pair_recall"], m["pair_precision"]) == (0.0, 0.0)
    # Q̂ has (1,2) = 1/2 alone; Q has (0,1) = (0,2) = 1/4: sqrt(2 (1/16 + 1/16 + 1/4)).
    assert m["cooc_dist_pairs"] == pytest.approx(math.sqrt(0.75))
    # A scaled copy of the true pattern has distance 0 in cooc_dist_pairs but not in cooc_dist:
    # every image predicts labels {0, 1}, the truth has them in half the images.
    targets = np.array([[1, 1, 0], [0, 0, 1]])
    scores = np.array([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1]])
    m = mechanism_metrics(scores, targets)
    # P(0,1): predicted 2/2, true 1/2, twice in the matrix: sqrt(2 (1/2)^2).
    assert m["cooc_dist_pairs"] == 0.0 and m["cooc_dist"] == pytest.approx(math.sqrt(2 * 0.5**2))
    assert (m["pair_recall"], m["pair_precision"]) == (100.0, 50.0)
    # No pair at all in the truth: recall undefined.
    assert mechanism_metrics(np.array([[0.9, 0.1]]), np.array([[1, 0]]))["pair_recall"] is None
    with pytest.raises(ConfigError, match="one per class"):
        mechanism_metrics(SCORES, TARGETS, [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        mechanism_metrics(SCORES, TARGETS, [0.5, 0.5, float("nan")])


def test_metrics_at_thresholds_is_compute_metrics_of_the_thresholded_labels():
    rng = np.random.default_rng(0)
    targets = (rng.random((300, 7)) < 0.3).astype(int)
    scores = np.clip(0.6 * targets + 0.5 * rng.random((300, 7)), 0, 1)
    thresholds = np.array([0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
    scores[:5, :] = thresholds  # scores exactly at the threshold are NOT predicted (strictly greater)
    got = metrics_at_thresholds(scores, targets, thresholds)
    # A direct recomputation: predict s > t_c, then the P/R/F1 of those 0/1 predictions.
    direct = compute_metrics((scores > thresholds).astype(float), targets)
    for key in (*PRF_KEYS, "avg_labels", "cooc_dist"):
        assert got[key] == pytest.approx(direct[key], abs=1e-12), key
    # The ranking within each class is unchanged, so mAP is that of the raw scores.
    assert got["mAP"] == pytest.approx(compute_metrics(scores, targets)["mAP"], abs=1e-12)
    # top3 ranks the classes against each other: that of the raw scores, whatever the thresholds.
    assert got["top3"] == compute_metrics(scores, targets)["top3"]
    # One threshold of 0.5 everywhere: exactly compute_metrics.
    assert metrics_at_thresholds(scores, targets, 0.5) == compute_metrics(scores, targets)
    # Thresholds at the ends of [0, 1]: t = 0 predicts every positive score, t = 1 none.
    ends = metrics_at_thresholds(scores, targets, np.r_[0.0, np.ones(6)])
    assert ends["avg_labels"] == pytest.approx((scores[:, 0] > 0).mean())


def test_tune_thresholds_by_hand():
    # Class 0: positives 0.4, 0.6, 0.8; negative 0.2. Every t in [0.2, 0.4) gives F1 = 1; the grid
    # point closest to 0.5 among them is 0.39. Class 1: positive 0.9, negatives 0.7, 0.3 -> any t in
    # [0.7, 0.9) gives F1 = 1: closest to 0.5 is 0.7. Class 2 has no positive: it keeps 0.5.
    scores = np.array([[0.2, 0.7, 0.1], [0.4, 0.3, 0.9], [0.6, 0.9, 0.5], [0.8, 0.3, 0.2]])
    targets = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(tune_thresholds(scores, targets, per_class=True), [0.39, 0.7, 0.5])
    # One global threshold maximising C-F1 over the two evaluated classes: at t in [0.2, 0.3),
    # class 0 F1 1 and class 1 predicted by 0.7, 0.9, 0.3, 0.3 -> P 1/4; at [0.4, 0.6) class 0
    # R 2/3 P 1, class 1 P 1/2 R 1 -> C-P 3/4 C-R 5/6; at [0.7, 0.8): class 0 {0.8} P 1 R 1/3,
    # class 1 {0.9} P 1 R 1 -> C-P 1, C-R 2/3, C-F1 0.8; [0.3, 0.4): class 0 P 1 R 1, class 1 P 1/2
    # R 1 -> C-P 3/4, C-R 1, C-F1 6/7 = 0.857, the best. Closest to 0.5 in it: 0.39.
    np.testing.assert_allclose(tune_thresholds(scores, targets), [0.39, 0.39, 0.39])
    with pytest.raises(ConfigError, match="threshold grid"):
        tune_thresholds(scores, targets, grid=[0.0, 0.5])


def _mirrored_tie(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """One class whose F1 over the grid peaks at 2/3 at exactly ``low`` and ``high`` (low < 0.5 <
    high, mirrored about 0.5), and is lower at every other grid point (steps of 0.01).

    Scores (each 0.005 from a grid point, so no float rounding decides what is predicted):
    positive p1 = high + 0.005, negative n1 = high - 0.005, positive p2 and negative n2 at
    low + 0.005, negative n3 = low - 0.005. Predicted sets and F1 = 2 TP / (predicted + 2):
    t >= high + 0.01: {} -> 0; t = high: {p1} -> 2/3; low < t < high: {p1, n1} -> 1/2;
    t = low: {p1, n1, p2, n2} -> 4/6; t < low: n3 too -> 4/7."""
    scores = np.array([high + 0.005, high - 0.005, low + 0.005, low + 0.005, low - 0.005])
    targets = np.array([1, 0, 1, 0, 0])
    return scores, targets


MIRRORED_PAIRS = [(THRESHOLD_GRID[k - 1], THRESHOLD_GRID[99 - k]) for k in range(1, 50)]  # 0.01/0.99 ... 0.49/0.51


def test_the_mirrored_tie_is_a_tie_at_exactly_the_two_thresholds():
    assert [round(low + high, 9) for low, high in MIRRORED_PAIRS] == [1.0] * 49
    for low, high in MIRRORED_PAIRS:
        scores, targets = _mirrored_tie(low, high)
        f1 = np.array([2 * ((scores > t) & (targets == 1)).sum() / ((scores > t).sum() + 2) for t in THRESHOLD_GRID])
        assert THRESHOLD_GRID[f1 == f1.max()].tolist() == [low, high] and f1.max() == pytest.approx(2 / 3)


@pytest.mark.parametrize("per_class", [True, False], ids=["per-class", "global"])
def test_ties_at_equal_distance_from_one_half_go_to_the_lower_threshold(per_class):
    # Every mirrored pair of the grid: F1 ties at the two, and the documented rule (closest to 0.5,
    # then the lower one) picks the lower. As floats |0.7 - 0.5| < |0.3 - 0.5|: comparing the
    # distances as floats picked the upper one for 10 of the 49 pairs.
    columns = [_mirrored_tie(low, high) for low, high in MIRRORED_PAIRS]
    scores = np.stack([c[0] for c in columns], axis=1)  # (5, 49): one class per pair
    targets = np.stack([c[1] for c in columns], axis=1)
    lows = np.array([low for low, _ in MIRRORED_PAIRS])
    if per_class:
        np.testing.assert_array_equal(tune_thresholds(scores, targets, per_class=True), lows)
        # The order in which the grid is given does not matter.
        reversed_grid = THRESHOLD_GRID[::-1].copy()
        np.testing.assert_array_equal(tune_thresholds(scores, targets, per_class=True, grid=reversed_grid), lows)
    else:
        # One class at a time: with one class, C-F1 is that class's F1.
        got = [tune_thresholds(scores[:, [c]], targets[:, [c]])[0] for c in range(len(MIRRORED_PAIRS))]
        np.testing.assert_array_equal(got, lows)


def test_tuned_thresholds_maximise_validation_f1():
    # Against brute force on random data: no grid threshold beats the tuned one.
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 4)) < 0.25).astype(int)
    scores = np.clip(0.3 * targets + 0.7 * rng.random((200, 4)), 0, 1)
    grid = np.round(np.arange(1, 100) / 100, 2)
    best = metrics_at_thresholds(scores, targets, tune_thresholds(scores, targets))["C-F1"]
    assert all(compute_metrics(scores, targets, t)["C-F1"] <= best + 1e-9 for t in grid)
    per_class = tune_thresholds(scores, targets, per_class=True)
    for c in range(4):
        def f1(t, c=c):
            predicted = scores[:, c] > t
            tp = (predicted & (targets[:, c] == 1)).sum()
            return 2 * tp / (predicted.sum() + targets[:, c].sum())

        assert all(f1(t) <= f1(per_class[c]) + 1e-12 for t in grid)
