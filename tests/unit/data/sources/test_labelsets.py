"""The labelsets benchmark: file format, the noise model's formula, determinism, the hidden-label
rule by hand, and the knob's documented extremes on NUS-WIDE-81's real label sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastmlgan.config import Config, DataConfig, parse_args
from fastmlgan.data.sources.labelsets import (
    EVIDENCE_SCALE,
    NOISE_STREAM,
    LabelSetFeatures,
    NoiseModel,
    evidence_auc,
    generate_evidence,
    hidden_labels,
    load_labelsets,
    read_label_matrix,
)
from fastmlgan.errors import ConfigError, DataError


def _write(path, rows):
    path.write_text("".join(f"{name} {' '.join(map(str, values))}\n" for name, values in rows))
    return path


def _random_labels(num, num_classes, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((num, num_classes)) < 0.3).astype(np.uint8)
    y[:, 1] = y[:, 0]  # one dependent pair, so the hidden rule has something to find
    return y


def _auc_matrix(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, F): AUC of feature f for label c (Mann-Whitney from ranks; continuous features, no ties)."""
    ranks = np.argsort(np.argsort(features, axis=0), axis=0).astype(np.float64) + 1.0
    y = labels.astype(np.float64)
    n1 = y.sum(axis=0)
    n0 = len(y) - n1
    rank_sums = y.T @ ranks
    return (rank_sums - (n1 * (n1 + 1) / 2)[:, None]) / (n1 * n0)[:, None]


def _auc_sd(n1, n0):
    """Standard deviation of the AUC of an uninformative feature (Mann-Whitney null)."""
    return np.sqrt((n1 + n0 + 1) / (12.0 * n1 * n0))


# ---------------------------------------------------------------- the file format


def test_read_label_matrix_exact(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("images/a.jpg 0 1 1\n\nimages/b.jpg 0 0 0\r\nimages/c.jpg 1 0 1\n")
    names, y = read_label_matrix(path)
    assert names == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    np.testing.assert_array_equal(y, [[0, 1, 1], [0, 0, 0], [1, 0, 1]])  # the empty row is kept
    assert y.dtype == np.uint8


@pytest.mark.parametrize(
    "text, line, needle",
    [
        ("a 0 1\nb 0 1 1\n", 2, "expected a name and 2 label values"),
        ("a 0 1\nb 0 2\n", 2, "'2' of 'b' is not 0 or 1"),
        ("a 0 1\n\nb 1 -1\n", 3, "'-1'"),
        ("a\n", 1, "at least one 0/1 label value"),
        ("a 0 1\nb 0 1.0\n", 2, "'1.0'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, text, line, needle):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_label_matrix(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ") and needle in message
    assert "\n" not in message


def test_empty_missing_and_binary_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=f"^{empty}: no rows"):
        read_label_matrix(empty)
    with pytest.raises(DataError, match="no such file"):
        read_label_matrix(tmp_path / "absent.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"a 0 1\nb \xff 1\n")
    with pytest.raises(DataError, match=f"^{binary}:2: not UTF-8"):
        read_label_matrix(binary)


def test_test_list_with_other_columns_names_its_line(tmp_path):
    train = _write(tmp_path / "train.txt", [("a", [0, 1, 1]), ("b", [1, 0, 0])])
    test = tmp_path / "test.txt"
    test.write_text("\n\nc 0 1\n")
    with pytest.raises(DataError, match=rf"^{test}:3: expected a name and 3 label values \(as the training list"):
        load_labelsets(train, test)


def test_class_names_beside_given_or_numbered(tmp_path):
    rows = [("a", [1, 1, 0]), ("b", [1, 0, 1]), ("c", [0, 1, 1])]
    train, test = _write(tmp_path / "train.txt", rows), _write(tmp_path / "test.txt", rows)
    noise = NoiseModel(hidden_fraction=0.0)
    assert load_labelsets(train, test, noise=noise)[0].class_names == ["label0", "label1", "label2"]
    (tmp_path / "concepts3.txt").write_text("sky\nclouds\n\nsun\n")
    tr, te = load_labelsets(train, test, noise=noise)
    assert tr.class_names == te.class_names == ["sky", "clouds", "sun"]
    assert tr.feature_names == ["evidence:sky", "evidence:clouds", "evidence:sun"]
    given = tmp_path / "names.txt"
    given.write_text("x\ny\n")
    with pytest.raises(DataError, match=f"^{given}: 2 class names, but the label lists have 3 columns"):
        load_labelsets(train, test, given, noise)
    given.write_text("x\ny\nx\n")
    with pytest.raises(DataError, match=f"^{given}:3: label 'x' repeats line 1"):
        load_labelsets(train, test, given, noise)
    with pytest.raises(DataError, match="'moon' not among the 3 class names"):
        load_labelsets(train, test, noise=NoiseModel(hidden=("sky", "moon")))
    tr, _ = load_labelsets(train, test, noise=NoiseModel(hidden=("sun", "sky")))
    assert tr.hidden == (0, 2)


# ---------------------------------------------------------------- the noise model


def test_evidence_is_the_documented_formula():
    y = _random_labels(500, 6, 0)
    noise = NoiseModel(evidence=0.4, hidden_evidence=0.25, seed=3)
    x = generate_evidence(y, [1, 4], noise, split=1)
    # An independent recomputation: x − ε must be (d_c / 2)(2y − 1), d = S e (ρ S e if hidden).
    eps = np.random.default_rng([NOISE_STREAM, 3, 1]).standard_normal(y.shape)
    d = np.array([1, 0.25, 1, 1, 0.25, 1]) * EVIDENCE_SCALE * 0.4
    np.testing.assert_allclose(x - eps, 0.5 * d * (2.0 * y - 1.0), atol=1e-6)
    assert x.dtype == np.float32


def test_documented_auc_table():
    # The module docstring's table: AUC = Φ(6e / √2).
    expected = {0.0: 0.5, 0.1: 0.66, 0.25: 0.86, 0.5: 0.983, 0.75: 0.9993, 1.0: 0.99999}
    for e, auc in expected.items():
        assert evidence_auc(EVIDENCE_SCALE * e) == pytest.approx(auc, abs=6e-3 if e < 0.5 else 5e-4)
    # Independently, by sampling: AUC = P(x of a present label > x of an absent one) at d = 3.
    rng = np.random.default_rng(0)
    n = 400_000
    present, absent = rng.normal(1.5, 1.0, n), rng.normal(-1.5, 1.0, n)
    estimate = float((present > absent).mean())
    assert abs(evidence_auc(3.0) - estimate) < 5 * math.sqrt(estimate * (1 - estimate) / n)


def test_determinism_same_seed_identical_other_seed_different(tmp_path):
    y = _random_labels(300, 5, 1)
    before = y.copy()
    a = generate_evidence(y, [2], NoiseModel(seed=7), split=0)
    b = generate_evidence(y, [2], NoiseModel(seed=7), split=0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(y, before)  # pure: the labels are not touched
    other_seed = generate_evidence(y, [2], NoiseModel(seed=8), split=0)
    other_split = generate_evidence(y, [2], NoiseModel(seed=7), split=1)
    assert not np.array_equal(a, other_seed) and not np.array_equal(a, other_split)
    # Differences are noise-sized everywhere, not one changed value.
    assert np.mean(a != other_seed) > 0.99

    rows = [(f"s{i}", r) for i, r in enumerate(y)]
    train, test = _write(tmp_path / "train.txt", rows), _write(tmp_path / "test.txt", rows[:50])
    first = load_labelsets(train, test, noise=NoiseModel(seed=7))
    second = load_labelsets(train, test, noise=NoiseModel(seed=7))
    for s1, s2 in zip(first, second):
        np.testing.assert_array_equal(s1.features, s2.features)
        np.testing.assert_array_equal(s1.labels, s2.labels)
        assert s1.hidden == s2.hidden
    assert not np.array_equal(first[0].features, load_labelsets(train, test, noise=NoiseModel(seed=9))[0].features)


def test_hidden_labels_greedy_by_hand():
    # Columns a, b, c, d. ab x4, a x4, c x2, cd x1, d x3:
    #   n = (8, 4, 3, 4); n_ab = 4, n_cd = 1.  With κ = 0, r_i = max_j n_ij / n_j:
    #   r_a = 4/4 = 1, r_b = 4/8, r_c = 1/4, r_d = 1/3.
    # Step 1 hides a. Step 2: b's only partner a is hidden -> 0; r_c = 1/4, r_d = 1/3 -> d.
    # Step 3: b 0, c 0 (d hidden) -> the tie goes to the lower index, b.
    # A non-greedy top-3 of the initial r would give a, b, d.
    rows = [[1, 1, 0, 0]] * 4 + [[1, 0, 0, 0]] * 4 + [[0, 0, 1, 0]] * 2 + [[0, 0, 1, 1]] + [[0, 0, 0, 1]] * 3
    y = np.array(rows)
    assert hidden_labels(y, 3, pseudocount=0.0) == [0, 3, 1]
    assert hidden_labels(y, 0) == []
    # κ = 10 shrinks the estimate for rare partners: r_a = 4/14, r_b = 4/18, r_c = 1/14, r_d = 1/13.
    assert hidden_labels(y, 2) == [0, 3]
    with pytest.raises(DataError, match="at least one must stay visible"):
        hidden_labels(y, 4)


def test_subset_keeps_the_hidden_labels(tmp_path):
    y = _random_labels(40, 4, 2)
    rows = [(f"s{i}", r) for i, r in enumerate(y)]
    train, _ = load_labelsets(_write(tmp_path / "a.txt", rows), _write(tmp_path / "b.txt", rows), noise=NoiseModel(hidden_fraction=0.5))
    part = train.subset([3, 1])
    assert isinstance(part, LabelSetFeatures) and part.hidden == train.hidden and len(train.hidden) == 2
    np.testing.assert_array_equal(part.labels, y[[3, 1]])


# ---------------------------------------------------------------- config and registry


def test_config_validation_and_backbone():
    for key in ("labelsets_evidence", "labelsets_hidden_fraction", "labelsets_hidden_evidence"):
        with pytest.raises(ConfigError, match=f"--data.{key} must be a finite number in"):
            DataConfig(**{key: 1.5})
        with pytest.raises(ConfigError, match=f"--data.{key} must be a finite number in"):
            DataConfig(**{key: float("nan")})
    with pytest.raises(ConfigError, match="data.dataset=labelsets needs model.backbone=mlp"):
        parse_args(["--data.dataset", "labelsets", "--model.backbone", "smallcnn"])
    cfg = parse_args(["--preset", "reproduce-mulan", "--data.dataset", "labelsets"])
    assert isinstance(cfg, Config) and cfg.model.backbone == "mlp"


def test_build_splits_and_loader(tmp_path):
    import torch

    from fastmlgan.data.factory import build_loaders, build_splits
    from fastmlgan.distributed import DistInfo

    y = _random_labels(64, 3, 4)
    rows = [(f"s{i}", r) for i, r in enumerate(y)]
    names = tmp_path / "names.txt"
    names.write_text("p\nq\nr\n")
    cfg = parse_args([
        "--preset", "reproduce-mulan", "--data.dataset", "labelsets",
        "--data.labelsets_train", str(_write(tmp_path / "tr.txt", rows)),
        "--data.labelsets_test", str(_write(tmp_path / "te.txt", rows[:20])),
        "--data.labelsets_names", str(names), "--data.labelsets_hidden", "q",
        "--data.labelsets_evidence", "1.0", "--data.batch_size", "16",
    ])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    splits = build_splits(cfg.data, info)
    assert splits.class_names == ["p", "q", "r"] and splits.train.hidden == (1,)
    np.testing.assert_array_equal(splits.train.labels, y)
    _, evaluation = build_loaders(cfg.data, splits, info, seed=0)
    batch = next(iter(evaluation))
    np.testing.assert_array_equal(batch["labels"].numpy(), y[: len(batch["labels"])])
    # The evaluation split's evidence, standardised with the TRAINING split's mean and std.
    x = splits.train.features.astype(np.float64)
    expected = (splits.val.features[: len(batch["image"])] - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(batch["image"].numpy(), expected, rtol=1e-4, atol=1e-4)
    for key in ("labelsets_train", "labelsets_test"):
        bad = parse_args(["--preset", "reproduce-mulan", "--data.dataset", "labelsets", f"--data.{key}", "x"])
        with pytest.raises(ConfigError, match="data.dataset=labelsets needs --data.labelsets_"):
            build_splits(bad.data, info)


# ---------------------------------------------------------------- NUS-WIDE-81's real label sets


@pytest.fixture(scope="module")
def nuswide_lists(shared_data):
    return shared_data / "nuswide81_lists"


@pytest.mark.realdata
def test_real_label_statistics_equal_the_source_lists(nuswide_lists):
    train, test = load_labelsets(nuswide_lists / "train.txt", nuswide_lists / "test.txt")
    for split, name, rows in ((train, "train.txt", 10000), (test, "test.txt", 5000)):
        # An independent parse of the same file: every row, in order, exactly.
        source = np.loadtxt(nuswide_lists / name, usecols=range(1, 82), dtype=np.uint8)
        assert split.labels.shape == (rows, 81)
        np.testing.assert_array_equal(split.labels, source)
    assert train.class_names[:3] == ["airport", "animal", "beach"] and train.class_names[-1] == "zebra"
    assert train.labels.sum(axis=1).mean() == pytest.approx(2.4357)
    # The greedy rule's first picks, as the module docstring says.
    order = hidden_labels(train.labels, 16)
    assert [train.class_names[c] for c in order[:5]] == ["animal", "sky", "water", "clouds", "buildings"]
    assert train.hidden == tuple(sorted(order))


@pytest.mark.realdata
def test_real_knob_extremes(nuswide_lists):
    y = read_label_matrix(nuswide_lists / "train.txt")[1]
    hidden = hidden_labels(y, 16)
    visible = np.setdiff1d(np.arange(81), hidden)
    counts = y.sum(axis=0)

    # e = 1: a threshold at 0 on each visible label's own evidence recovers it; the documented
    # error rate is Φ(−3) = 0.135% of the cells. Over the 650,000 visible cells its SD is 4.6e-5,
    # so 0.2% is 14 SD away (false-failure rate far below 1e-9).
    x = generate_evidence(y, hidden, NoiseModel(evidence=1.0), split=0)
    errors = np.mean((x[:, visible] > 0) != y[:, visible].astype(bool))
    assert errors < 0.002, errors
    auc = _auc_matrix(x, y)
    frequent = counts >= 50
    own = np.diag(auc)
    assert own[visible][frequent[visible]].min() > 0.999  # Φ(6/√2) = 0.99999

    # ... while with ρ = 0 a hidden label's own coordinate is pure noise even at e = 1. Bound: for
    # every hidden label with >= 50 positives, |AUC − 0.5| <= 5.7 null SDs (two-sided normal tail
    # 1.2e-8 per test; Bonferroni over <= 81 x 81 tests: false-failure rate < 1e-4).
    z = 5.7
    hidden_frequent = [c for c in hidden if frequent[c]]
    sd = _auc_sd(counts, len(y) - counts)
    assert np.all(np.abs(own[hidden_frequent] - 0.5) <= z * sd[hidden_frequent])

    # e = 0: no feature tells anything about any label (every frequent label x every feature).
    x0 = generate_evidence(y, hidden, NoiseModel(evidence=0.0), split=0)
    auc0 = _auc_matrix(x0, y)[frequent]
    assert np.all(np.abs(auc0 - 0.5) <= z * sd[frequent][:, None]), np.abs(auc0 - 0.5).max()

    # In between, the visible labels' AUC is the documented Φ(d / √2): 0.983 at e = 0.5. The mean
    # over the frequent visible labels has an SD below 0.001 here; bound 0.004.
    x5 = generate_evidence(y, hidden, NoiseModel(evidence=0.5), split=0)
    own5 = np.diag(_auc_matrix(x5, y))
    assert own5[visible][frequent[visible]].mean() == pytest.approx(evidence_auc(3.0), abs=0.004)
