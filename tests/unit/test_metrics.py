"""fastmlgan.metrics against hand arithmetic and an independent loop implementation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastmlgan.commands.metrics import main
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.metrics import PRF_KEYS, compute_metrics, format_table

REPO_ROOT = Path(__file__).resolve().parents[2]

# The hand example: 4 images x 3 classes.
HAND_TARGETS = np.array([
    [1, 0, 1],
    [0, 1, 0],
    [1, 1, 0],
    [0, 0, 1],
])
HAND_SCORES = np.array([
    [0.9, 0.2, 0.6],   # predicted (> 0.5): {0, 2}
    [0.3, 0.8, 0.7],   # {1, 2}
    [0.6, 0.4, 0.1],   # {0}
    [0.1, 0.55, 0.95], # {1, 2}
])


def assert_metrics(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


# ---------------------------------------------------------------- hand computations


def test_hand_example_every_key():
    m = compute_metrics(HAND_SCORES, HAND_TARGETS)
    # class 0: targets {0,2}, predicted {0,2}      -> TP 2 FP 0 FN 0: P 1,   R 1
    # class 1: targets {1,2}, predicted {1,3}      -> TP 1 FP 1 FN 1: P 1/2, R 1/2
    # class 2: targets {0,3}, predicted {0,1,3}    -> TP 2 FP 1 FN 0: P 2/3, R 1
    # C-P = (1 + 1/2 + 2/3)/3 = 13/18;  C-R = (1 + 1/2 + 1)/3 = 5/6 = 15/18
    # C-F1 = 2 (13/18)(15/18) / (28/18) = 390/504
    # pooled: TP 5, FP 2, FN 1 -> O-P 5/7, O-R 5/6, O-F1 = 2*5/(2*5 + 2 + 1) = 10/13
    # AP class 0: ranks 0.9(+) 0.6(+) ...             -> 1
    # AP class 1: ranks 0.8(+) 0.55(-) 0.4(+) 0.2(-)  -> (1/1 + 2/3)/2 = 5/6
    # AP class 2: ranks 0.95(+) 0.7(-) 0.6(+) 0.1(-)  -> 5/6
    # mAP = (1 + 5/6 + 5/6)/3 = 8/9
    # labels/img = (2 + 2 + 1 + 2)/4 = 7/4
    # co-occurrence / 4 images, pairs (0,1) (0,2) (1,2):
    #   true: images {2}, {0}, {}     -> 1/4, 1/4, 0
    #   pred: {},  {0}, {1,3}         -> 0,   1/4, 2/4
    #   differences -1/4, 0, 1/2, each twice in the symmetric matrix:
    #   sqrt(2 (1/16 + 1/4)) = sqrt(0.625)
    # top3 with C = 3 predicts every label: each class TP 2 FP 2 -> P 1/2, R 1;
    #   F1 = 2 (1/2)(1) / (3/2) = 2/3, the same pooled.
    assert_metrics(m, {
        "C-P": 100 * 13 / 18,
        "C-R": 100 * 15 / 18,
        "C-F1": 100 * 390 / 504,
        "O-P": 100 * 5 / 7,
        "O-R": 100 * 5 / 6,
        "O-F1": 100 * 10 / 13,
        "mAP": 100 * 8 / 9,
        "avg_labels": 7 / 4,
        "cooc_dist": math.sqrt(0.625),
    })
    assert_metrics(m["top3"], {"C-P": 50, "C-R": 100, "C-F1": 200 / 3, "O-P": 50, "O-R": 100, "O-F1": 200 / 3})
    assert (m["num_images"], m["num_classes"], m["num_classes_evaluated"]) == (4, 3, 3)
    assert set(m) == {*PRF_KEYS, "mAP", "avg_labels", "cooc_dist", "top3",
                      "num_images", "num_classes", "num_classes_evaluated"}
    assert set(m["top3"]) == set(PRF_KEYS)
    # Plain Python numbers, so the dict is JSON as it stands.
    assert json.loads(json.dumps(m)) == m


def test_c_f1_is_harmonic_mean_of_averages_not_mean_of_per_class_f1():
    targets = np.array([[1, 1], [0, 1], [0, 1], [0, 1]])
    scores = np.array([[0.9, 0.9], [0.1, 0.1], [0.1, 0.1], [0.1, 0.1]])
    # class 0: P 1, R 1, F1 1.   class 1: P 1, R 1/4, F1 = 2(1/4)/(5/4) = 2/5.
    # mean of per-class F1 = (1 + 2/5)/2 = 0.7
    # C-P = 1, C-R = 5/8 -> C-F1 = 2(5/8)/(13/8) = 10/13 = 0.769...
    m = compute_metrics(scores, targets)
    assert m["C-F1"] == pytest.approx(100 * 10 / 13)
    assert abs(m["C-F1"] - 70.0) > 5


def test_map_matches_sklearn_documented_example():
    # sklearn's average_precision_score docstring: y=[0,0,1,1], s=[0.1,0.4,0.35,0.8] -> 0.83333
    # ranks 0.8(+) 0.4(-) 0.35(+) 0.1(-): (1/1 + 2/3)/2 = 5/6
    m = compute_metrics(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]]))
    assert m["mAP"] == pytest.approx(100 * 5 / 6)


def test_map_groups_tied_scores_into_one_threshold():
    y = np.array([1, 0, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.9, 0.2, 0.2])
    # distinct thresholds 0.9, 0.5, 0.2:
    #   >= 0.9: TP 1 FP 0 -> P 1,   R 1/3
    #   >= 0.5: TP 2 FP 1 -> P 2/3, R 2/3
    #   >= 0.2: TP 3 FP 2 -> P 3/5, R 1
    # AP = (1/3)(1) + (1/3)(2/3) + (1/3)(3/5) = 34/45
    # (ordering the tied positive at 0.5 first would give P 1 there, and AP 38/45 instead.)
    expected = 100 * 34 / 45
    for perm in ([0, 1, 2, 3, 4], [1, 0, 2, 4, 3], [4, 3, 2, 1, 0]):
        m = compute_metrics(s[perm, None], y[perm, None])
        assert m["mAP"] == pytest.approx(expected), perm
    # All scores tied: one threshold, AP = precision over everything = prevalence 3/5.
    assert compute_metrics(np.full((5, 1), 0.3), y[:, None])["mAP"] == pytest.approx(60.0)


def test_threshold_is_strict():
    targets = np.array([[1], [1], [0]])
    # 0.5 is not > 0.5: only the first image is predicted -> TP 1 of 2 positives, FP 0.
    m = compute_metrics(np.array([[0.51], [0.5], [0.2]]), targets)
    assert m["O-R"] == pytest.approx(50.0)
    assert m["avg_labels"] == pytest.approx(1 / 3)
    # The same at a custom threshold: 0.2 is not > 0.2, so still one prediction of three images.
    m = compute_metrics(np.array([[0.51], [0.2], [0.1]]), targets, threshold=0.2)
    assert m["O-R"] == pytest.approx(50.0)
    assert m["avg_labels"] == pytest.approx(1 / 3)


def test_top3_ignores_threshold_and_breaks_ties_by_lower_index():
    scores = np.array([
        [0.1, 0.3, 0.2, 0.3, 0.05],  # top 3: 0.3 (1), 0.3 (3), 0.2 (2)          -> {1, 2, 3}
        [0.2, 0.2, 0.2, 0.2, 0.4],   # top 3: 0.4 (4), then the tie at 0.2: 0, 1 -> {0, 1, 4}
    ])
    targets = np.array([
        [0, 1, 0, 1, 1],
        [1, 0, 0, 0, 1],
    ])
    m = compute_metrics(scores, targets)
    # Every score is below 0.5: nothing predicted. Classes with no predictions have precision 0,
    # O-P is 0, F1s are 0.
    assert_metrics(m, {key: 0.0 for key in PRF_KEYS} | {"avg_labels": 0.0})
    # top3: class 0 TP 1 FP 0 FN 0 (P 1, R 1);   class 1 TP 1 FP 1 (P 1/2, R 1);
    #       class 2 has no positive target: left out of C- (its FP still counts in O-);
    #       class 3 TP 1 (P 1, R 1);             class 4 TP 1 FN 1 (P 1, R 1/2).
    # C-P = (1 + 1/2 + 1 + 1)/4 = 7/8;  C-R = (1 + 1 + 1 + 1/2)/4 = 7/8;  C-F1 = 7/8
    # pooled: 6 predicted, TP 4, FP 2, FN 1 -> O-P 4/6, O-R 4/5, O-F1 = 8/11
    # (breaking the tie towards higher indices would pick {2, 3, 4} for image 1: O-P 3/6.)
    assert_metrics(m["top3"], {"C-P": 87.5, "C-R": 87.5, "C-F1": 87.5,
                               "O-P": 100 * 4 / 6, "O-R": 80.0, "O-F1": 100 * 8 / 11})
    assert m["num_classes_evaluated"] == 4


def test_class_without_positives_is_excluded_from_class_averages_and_map():
    # Add class 3 to the hand example: no positive target, one (false) prediction on image 0.
    scores = np.column_stack([HAND_SCORES, [0.9, 0.1, 0.1, 0.1]])
    targets = np.column_stack([HAND_TARGETS, [0, 0, 0, 0]])
    m = compute_metrics(scores, targets)
    # C- metrics and mAP as in the hand example, over the same three classes.
    assert_metrics(m, {"C-P": 100 * 13 / 18, "C-R": 100 * 15 / 18, "mAP": 100 * 8 / 9})
    # The extra false positive is pooled into O-: TP 5 of 8 predicted.
    assert m["O-P"] == pytest.approx(100 * 5 / 8)
    assert (m["num_classes"], m["num_classes_evaluated"]) == (4, 3)


def test_class_never_predicted_has_precision_zero():
    targets = np.array([[1, 1], [0, 1]])
    scores = np.array([[0.9, 0.1], [0.1, 0.1]])
    # class 0: P 1, R 1;  class 1: never predicted -> P 0 (not left out), R 0.
    m = compute_metrics(scores, targets)
    assert m["C-P"] == pytest.approx(50.0)
    assert m["C-R"] == pytest.approx(50.0)


def test_cooc_dist_ignores_the_diagonal():
    # Predictions differ from the truth in single-label frequencies but neither has any pair.
    targets = np.array([[1, 0], [0, 1]])
    scores = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert compute_metrics(scores, targets)["cooc_dist"] == 0.0
    # A predicted pair that never occurs: (0,1) at 1/2 of images, twice in the matrix:
    # sqrt(2 * (1/2)^2) = sqrt(1/2)
    scores = np.array([[0.9, 0.9], [0.1, 0.9]])
    assert compute_metrics(scores, targets)["cooc_dist"] == pytest.approx(math.sqrt(0.5))


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "scores, targets, match",
    [
        (np.zeros((4, 3)), np.zeros((4, 2)), "differ in shape"),
        (np.zeros(4), np.zeros(4), "2-D"),
        (np.array([[0.2, np.nan]]), np.array([[1, 0]]), "NaN"),
        (np.array([[0.2, np.inf]]), np.array([[1, 0]]), "NaN or infinite"),
        (np.array([[0.2, 1.5]]), np.array([[1, 0]]), "--logits"),
        (np.array([[0.2, -0.1]]), np.array([[1, 0]]), r"\[0, 1\]"),
        (np.array([[0.2, 0.4]]), np.array([[1, 2]]), "0/1"),
        (np.array([[0.2, 0.4]]), np.array([[0, 0]]), "no class has a positive"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "empty"),
    ],
)
def test_bad_input_raises_data_error(scores, targets, match):
    with pytest.raises(DataError, match=match):
        compute_metrics(scores, targets)


def test_bad_threshold_raises_config_error():
    with pytest.raises(ConfigError, match="threshold"):
        compute_metrics(HAND_SCORES, HAND_TARGETS, threshold=1.5)


# ---------------------------------------------------------------- table


def test_format_table_layout():
    m = compute_metrics(HAND_SCORES, HAND_TARGETS)
    table = format_table({"baseline": m, "CNN-RNN": {"C-P": 40.5, "C-R": 30.4}}, title="Table 1")
    # 72.22 77.38 71.43 76.92 88.89 round to one decimal; 1.75 labels/img to two.
    assert table.splitlines() == [
        "Table 1",
        "Methods    C-P   C-R  C-F1   O-P   O-R  O-F1   mAP  labels/img",
        "--------------------------------------------------------------",
        "baseline  72.2  83.3  77.4  71.4  83.3  76.9  88.9        1.75",
        "CNN-RNN   40.5  30.4     -     -     -     -     -           -",
    ]


# ---------------------------------------------------------------- an independent reference


def reference_metrics(scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict:
    """The definitions written out as loops, sharing no code with fastmlgan.metrics."""
    n, c = scores.shape
    s, y = scores.tolist(), targets.astype(int).tolist()

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r else 0.0

    def prf(pred):
        class_p, class_r = [], []
        tp_all = fp_all = fn_all = 0
        for j in range(c):
            tp = sum(1 for i in range(n) if pred[i][j] and y[i][j])
            fp = sum(1 for i in range(n) if pred[i][j] and not y[i][j])
            fn = sum(1 for i in range(n) if not pred[i][j] and y[i][j])
            tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
            if tp + fn:
                class_p.append(tp / (tp + fp) if tp + fp else 0.0)
                class_r.append(tp / (tp + fn))
        cp, cr = sum(class_p) / len(class_p), sum(class_r) / len(class_r)
        op = tp_all / (tp_all + fp_all) if tp_all + fp_all else 0.0
        orc = tp_all / (tp_all + fn_all)
        return {"C-P": 100 * cp, "C-R": 100 * cr, "C-F1": 100 * f1(cp, cr),
                "O-P": 100 * op, "O-R": 100 * orc, "O-F1": 100 * f1(op, orc)}

    pred = [[s[i][j] > threshold for j in range(c)] for i in range(n)]
    out = prf(pred)

    aps = []
    for j in range(c):
        num_pos = sum(y[i][j] for i in range(n))
        if not num_pos:
            continue
        ap, prev_recall = 0.0, 0.0
        for t in sorted({s[i][j] for i in range(n)}, reverse=True):
            hits = [i for i in range(n) if s[i][j] >= t]
            tp = sum(y[i][j] for i in hits)
            recall = tp / num_pos
            ap += (recall - prev_recall) * tp / len(hits)
            prev_recall = recall
        aps.append(ap)
    out["mAP"] = 100 * sum(aps) / len(aps)
    out["avg_labels"] = sum(map(sum, pred)) / n

    sq = 0.0
    for a in range(c):
        for b in range(c):
            if a != b:
                p_pred = sum(1 for i in range(n) if pred[i][a] and pred[i][b]) / n
                p_true = sum(1 for i in range(n) if y[i][a] and y[i][b]) / n
                sq += (p_pred - p_true) ** 2
    out["cooc_dist"] = math.sqrt(sq)

    k = min(3, c)
    top = [set(sorted(range(c), key=lambda j: (-s[i][j], j))[:k]) for i in range(n)]
    out["top3"] = prf([[j in top[i] for j in range(c)] for i in range(n)])
    out["num_images"], out["num_classes"] = n, c
    out["num_classes_evaluated"] = sum(1 for j in range(c) if any(y[i][j] for i in range(n)))
    return out


def assert_same(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same(actual[key], value)
        else:
            assert actual[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def random_case(seed: int, num_images: int = 40, num_classes: int = 7):
    rng = np.random.default_rng(seed)
    # One decimal: many tied scores, and some exactly at the 0.5 threshold.
    scores = np.round(rng.random((num_images, num_classes)), 1)
    targets = (rng.random((num_images, num_classes)) < 0.3).astype(np.uint8)
    targets[:, 2] = 0  # a class without positives
    targets[0, 0] = 1
    return scores, targets


@pytest.mark.parametrize("seed", [1, 2])
def test_matches_reference_on_random_inputs(seed):
    scores, targets = random_case(seed)
    threshold = [0.5, 0.3][seed - 1]
    assert_same(compute_metrics(scores, targets, threshold), reference_metrics(scores, targets, threshold))


# ---------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmlgan", "metrics", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_cli_matches_reference(tmp_path):
    scores, targets = random_case(seed=7, num_images=50, num_classes=6)
    np.save(tmp_path / "scores.npy", scores)
    np.save(tmp_path / "targets.npy", targets)
    done = run_cli(str(tmp_path / "scores.npy"), str(tmp_path / "targets.npy"), "--threshold", "0.4")
    assert done.returncode == 0, done.stderr
    assert_same(json.loads(done.stdout), reference_metrics(scores, targets, 0.4))


def test_cli_logits(tmp_path):
    rng = np.random.default_rng(11)
    logits = np.round(rng.normal(0.0, 3.0, (30, 5)), 1)  # ties survive the sigmoid; 0.0 -> 0.5
    targets = (rng.random((30, 5)) < 0.4).astype(np.int64)
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "targets.npy", targets)
    probabilities = np.array([[1 / (1 + math.exp(-x)) for x in row] for row in logits.tolist()])
    done = run_cli(str(tmp_path / "logits.npy"), str(tmp_path / "targets.npy"), "--logits")
    assert done.returncode == 0, done.stderr
    assert_same(json.loads(done.stdout), reference_metrics(probabilities, targets))


def test_cli_missing_file_and_shape_mismatch_exit_2(tmp_path):
    np.save(tmp_path / "targets.npy", HAND_TARGETS)
    missing = tmp_path / "no_such_scores.npy"
    done = run_cli(str(missing), str(tmp_path / "targets.npy"))
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and str(missing) in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""

    np.save(tmp_path / "scores.npy", HAND_SCORES[:, :2])
    done = run_cli(str(tmp_path / "scores.npy"), str(tmp_path / "targets.npy"))
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and "differ in shape" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("case, match", [
    ("garbage", "cannot read scores file"),
    ("pickled", "cannot read scores file"),
    ("npz", ".npz archive"),
    ("out_of_range", "--logits"),
    ("nan_logits", "NaN"),
])
def test_cli_bad_input_in_process(tmp_path, capsys, case, match):
    scores_path, targets_path = tmp_path / "scores.npy", tmp_path / "targets.npy"
    np.save(targets_path, HAND_TARGETS)
    extra = []
    if case == "garbage":
        scores_path.write_bytes(b"not an npy file")
    elif case == "pickled":
        np.save(scores_path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "npz":
        scores_path = tmp_path / "scores.npz"
        np.savez(scores_path, scores=HAND_SCORES)
    elif case == "out_of_range":
        np.save(scores_path, HAND_SCORES * 4 - 2)
    elif case == "nan_logits":
        np.save(scores_path, np.where(HAND_SCORES > 0.8, np.nan, HAND_SCORES))
        extra = ["--logits"]
    assert main([str(scores_path), str(targets_path), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and match in captured.err
    assert captured.out == ""
