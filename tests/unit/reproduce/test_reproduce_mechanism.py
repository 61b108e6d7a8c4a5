"""The harness's mechanism measurements: thresholds tuned on the validation split only, the
hidden/visible subsets of labelsets, the paired threshold check by hand, and the sweep tables."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fastmlgan.commands import sweep as sweep_command
from fastmlgan.commands.reproduce import main
from fastmlgan.errors import ConfigError
from fastmlgan.reproduce import sweep, tables
from fastmlgan.reproduce.mechanism import mechanism_record, summarize_mechanism

NUM_LABELS = 5


def _labels(rng, n):
    """Label sets from three groups with a planted dependency; some rows empty."""
    groups = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 1, 0, 0, 1]])
    y = groups[rng.integers(0, 3, n)]
    return np.where(rng.random((n, NUM_LABELS)) < 0.1, 1 - y, y)


def _write_list(path: Path, y: np.ndarray) -> Path:
    path.write_text("".join(f"img{i} {' '.join(map(str, row))}\n" for i, row in enumerate(y)))
    return path


@pytest.fixture(scope="module")
def labelsets_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelsets")
    rng = np.random.default_rng(0)
    train = _write_list(root / "train.txt", _labels(rng, 160))
    test_y = _labels(rng, 80)
    test = _write_list(root / "test.txt", test_y)
    flipped = _write_list(root / "flipped.txt", 1 - test_y)
    out = root / "out"

    def argv(test_file, out_dir):
        return [
            "--data.dataset", "labelsets", "--model.backbone", "mlp",
            "--data.labelsets_train", str(train), "--data.labelsets_test", str(test_file),
            "--data.labelsets_hidden", "label1", "--data.labelsets_evidence", "0.5",
            "--data.batch_size", "8", "--model.width", "16", "--gan.proj_dim", "8", "--gan.hidden_dim", "16",
            "--gan.num_layers", "2", "--optim.bce_lr", "1e-2", "--train.bce_epochs", "3", "--train.gan_epochs", "2",
            "--seeds", "0,1", "--variants", "baseline,wgan,bce_continued", "--no-plots", "--out", str(out_dir),
        ]  # fmt: skip

    assert main(argv(test, out)) == 0
    return {"out": out, "argv": argv, "flipped": flipped, "root": root}


def _records(out: Path) -> dict:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {(r["seed"], r["variant"]): r for r in map(json.loads, lines)}


# An independent reference of the threshold check, in exact rational arithmetic (so ties are
# ties): the paper's class-averaged metrics (§4: C-P, C-R averaged over the classes with a positive
# target, C-F1 their harmonic mean) and the documented choice on the grid 0.01 ... 0.99 (highest
# C-F1, or each class's highest F1; ties: closest to 0.5, then the lower one).
GRID_STEPS = range(1, 100)  # threshold k / 100


def _ref_class_counts(scores, targets, thresholds):
    """Per class (true positives, predicted, positives) of score > threshold (per class)."""
    predicted = np.asarray(scores) > np.asarray(thresholds, dtype=np.float64)
    truth = np.asarray(targets).astype(bool)
    return [(int((predicted[:, c] & truth[:, c]).sum()), int(predicted[:, c].sum()), int(truth[:, c].sum()))
            for c in range(truth.shape[1])]  # fmt: skip


def _ref_class_prf(scores, targets, thresholds) -> tuple[Fraction, Fraction, Fraction]:
    counts = [(tp, pred, pos) for tp, pred, pos in _ref_class_counts(scores, targets, thresholds) if pos > 0]
    c_p = sum(Fraction(tp, pred) if pred else Fraction(0) for tp, pred, _ in counts) / len(counts)
    c_r = sum(Fraction(tp, pos) for tp, _, pos in counts) / len(counts)
    return c_p, c_r, (2 * c_p * c_r / (c_p + c_r) if c_p + c_r else Fraction(0))


def _ref_pick(values: dict[int, Fraction]) -> float:
    """The grid step with the highest value; ties: closest to 50, then the lower one."""
    best = max(values.values())
    return min((abs(k - 50), k) for k, v in values.items() if v == best)[1] / 100


def _ref_tune(scores, targets, per_class: bool) -> np.ndarray:
    num_classes = np.asarray(targets).shape[1]
    if not per_class:
        c_f1 = {k: _ref_class_prf(scores, targets, [k / 100] * num_classes)[2] for k in GRID_STEPS}
        return np.full(num_classes, _ref_pick(c_f1))
    out = []
    for c in range(num_classes):
        column_scores, column_targets = np.asarray(scores)[:, [c]], np.asarray(targets)[:, [c]]
        if not column_targets.any():
            out.append(0.5)
            continue
        f1 = {}
        for k in GRID_STEPS:
            ((tp, pred, pos),) = _ref_class_counts(column_scores, column_targets, [k / 100])
            f1[k] = Fraction(2 * tp, pred + pos)
        out.append(_ref_pick(f1))
    return np.array(out)


def test_thresholds_come_from_the_validation_scores_and_apply_to_the_test_scores(labelsets_run):
    out = labelsets_run["out"]
    for (seed, name), record in _records(out).items():
        val = np.load(out / "runs" / f"seed{seed}" / name / "val_scores.npz")
        test = np.load(out / "runs" / f"seed{seed}" / name / "test_scores.npz")
        assert len(val["targets"]) == 32 and len(test["targets"]) == 80  # 20% of 160; the test list
        mech = record["mechanism"]
        for mode, per_class in (("tuned_global", False), ("tuned_per_class", True)):
            t = _ref_tune(val["scores"], val["targets"], per_class)
            c_p, c_r, c_f1 = _ref_class_prf(test["scores"], test["targets"], t)
            assert mech[mode]["C-F1"] == pytest.approx(100 * float(c_f1), abs=1e-9), (seed, name, mode)
            assert (mech[mode]["C-P"], mech[mode]["C-R"]) == (pytest.approx(100 * float(c_p)), pytest.approx(100 * float(c_r)))
            assert mech[mode]["threshold_mean"] == pytest.approx(float(np.mean(t)), abs=1e-12)
            labels = (test["scores"] > t).sum(axis=1).mean()
            assert mech[mode]["avg_labels"] == pytest.approx(labels)
        assert mech["tuned_global"]["threshold"] == pytest.approx(_ref_tune(val["scores"], val["targets"], False)[0])
        # The hidden label (label1) and the visible ones, at 0.5.
        ((tp, _, pos),) = _ref_class_counts(test["scores"][:, [1]], test["targets"][:, [1]], [0.5])
        visible = [0, 2, 3, 4]
        assert mech["subsets"]["hidden"]["C-R"] == pytest.approx(100 * tp / pos)
        visible_f1 = _ref_class_prf(test["scores"][:, visible], test["targets"][:, visible], [0.5] * 4)[2]
        assert mech["subsets"]["visible"]["C-F1"] == pytest.approx(100 * float(visible_f1))
        assert mech["subsets"]["hidden"]["true_labels"] == pytest.approx(test["targets"][:, 1].mean())
        labels = (test["scores"] > 0.5).sum(axis=1).mean()
        assert mech["at_0.5"]["avg_labels"] == pytest.approx(labels) == record["test"]["avg_labels"]
        assert record["fit_s"] > 0


def test_flipped_test_labels_leave_every_tuned_threshold_unchanged(labelsets_run):
    out2 = labelsets_run["root"] / "out-flipped"
    assert main(labelsets_run["argv"](labelsets_run["flipped"], out2)) == 0
    a, b = _records(labelsets_run["out"]), _records(out2)
    for key in a:
        for mode in ("tuned_global", "tuned_per_class"):
            assert a[key]["mechanism"][mode]["threshold_mean"] == b[key]["mechanism"][mode]["threshold_mean"]
        assert a[key]["mechanism"]["tuned_global"]["C-F1"] != b[key]["mechanism"]["tuned_global"]["C-F1"]


def test_results_md_has_the_mechanism_sections(labelsets_run):
    text = (labelsets_run["out"] / "results.md").read_text()
    for heading in ("## The mechanism", "### Is the change a changed threshold?", "### Hidden and visible labels"):
        assert heading in text
    results = json.loads((labelsets_run["out"] / "results.json").read_text())
    assert results["dataset"].startswith("labelsets (")
    assert "threshold_check" in results["variants"]["wgan"]


def test_threshold_check_by_hand():
    def record(seed, name, c_f1, tuned):
        return {
            "seed": seed, "variant": name, "test": {"C-F1": c_f1, "O-F1": 0.0, "C-R": 0.0, "C-P": 0.0},
            "fit_s": 10.0 + seed,
            "mechanism": {
                "at_0.5": {"labels_gap": -1.0},
                "tuned_global": {"C-F1": tuned, "O-F1": 0.0, "C-R": 0.0, "C-P": 0.0},
                "tuned_per_class": {"C-F1": tuned + 1, "O-F1": 0.0, "C-R": 0.0, "C-P": 0.0},
            },
        }  # fmt: skip

    records = {
        (0, "baseline"): record(0, "baseline", 50.0, 55.0),
        (1, "baseline"): record(1, "baseline", 52.0, 56.0),
        (0, "wgan"): record(0, "wgan", 54.0, 55.5),
        (1, "wgan"): record(1, "wgan", 55.0, 57.5),
    }
    variants = {"baseline": {"seeds": [0, 1]}, "wgan": {"seeds": [0, 1]}}
    summarize_mechanism(variants, records, tables.paired_difference)
    check = variants["wgan"]["threshold_check"]
    # wgan at 0.5 minus baseline tuned global: 54 − 55 = −1, 55 − 56 = −1.
    assert check["C-F1: at_0.5 vs baseline tuned_global"]["per_seed"] == [-1.0, -1.0]
    # both tuned: 0.5, 1.5; both at 0.5: 4, 3.
    assert check["C-F1: tuned_global vs baseline tuned_global"]["mean"] == pytest.approx(1.0)
    assert check["C-F1: at_0.5 vs baseline at_0.5"]["per_seed"] == [4.0, 3.0]
    assert variants["wgan"]["mechanism"]["mean"]["fit_s"] == pytest.approx(10.5)


def test_sweep_reads_the_paired_differences(labelsets_run, tmp_path):
    out = labelsets_run["out"]
    results = json.loads((out / "results.json").read_text())
    points = sweep.collect([sweep.parse_point(f"0.5={out}"), sweep.parse_point(f"0.5c={out}:bce_continued")])
    assert points[0]["cells"]["ΔC-F1 vs (a)"] == results["variants"]["wgan"]["diff_vs_baseline"]["C-F1"]
    assert points[1]["label"] == "control: BCE continued, no D"
    assert points[0]["fit_ratio_to_control"] == pytest.approx(
        results["variants"]["wgan"]["mechanism"]["mean"]["fit_s"]
        / results["variants"]["bce_continued"]["mechanism"]["mean"]["fit_s"]
    )
    with pytest.raises(ConfigError, match="no row 'hard_samples'"):
        sweep.collect([sweep.parse_point(f"1={out}:hard_samples")])
    with pytest.raises(ConfigError, match="no such file"):
        sweep.collect([sweep.parse_point(f"1={tmp_path}")])
    with pytest.raises(ConfigError, match="expected X=RESULTS_DIR"):
        sweep.parse_point("nothing")
    assert sweep_command.main(["t", str(tmp_path), f"0.5={out}"]) == 0
    assert "| 0.5 | + WGAN-gp | 2 |" in (tmp_path / "sweep-t.md").read_text()


METRIC_KEYS = ("C-P", "C-R", "C-F1", "O-F1", "mAP", "avg_labels")


def test_sweep_cells_are_the_per_seed_differences_by_hand(labelsets_run, tmp_path):
    # The tiny runs give rows too alike to tell columns apart, so the records get distinct made-up
    # test metrics and the harness rewrites its tables from them (every row is finished: nothing
    # trains). Each cell is then recomputed from the records: a wrong key in sweep.COLUMNS, a
    # swapped cell or a wrong paired difference fails here.
    out = tmp_path / "out"
    shutil.copytree(labelsets_run["out"], out)
    rng = np.random.default_rng(7)
    lines = []
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["test"].update({key: float(rng.uniform(10, 90)) for key in METRIC_KEYS})
        lines.append(json.dumps(record))
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert main(labelsets_run["argv"](labelsets_run["root"] / "test.txt", out)) == 0
    records = _records(out)
    seeds = sorted({seed for seed, _ in records})

    def by_hand(row, ref, key):
        d = np.array([records[s, row]["test"][key] - records[s, ref]["test"][key] for s in seeds])
        return f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f}"

    point = sweep.collect([sweep.parse_point(f"0.5={out}")])[0]
    for column, ref, key in [
        ("ΔC-F1 vs (a)", "baseline", "C-F1"), ("ΔO-F1 vs (a)", "baseline", "O-F1"),
        ("ΔC-R vs (a)", "baseline", "C-R"), ("ΔC-P vs (a)", "baseline", "C-P"),
        ("Δlabels/img vs (a)", "baseline", "avg_labels"), ("ΔmAP vs (a)", "baseline", "mAP"),
        ("ΔC-F1 vs no-D control", "bce_continued", "C-F1"), ("ΔO-F1 vs no-D control", "bce_continued", "O-F1"),
    ]:  # fmt: skip
        assert sweep._cell(point["cells"][column]).split(" **")[0] == by_hand("wgan", ref, key), column
    # + WGAN-gp at 0.5 against the baseline at its validation-tuned threshold.
    tuned = [records[s, "wgan"]["test"]["C-F1"] - records[s, "baseline"]["mechanism"]["tuned_global"]["C-F1"] for s in seeds]
    assert point["cells"]["ΔC-F1 vs (a) tuned global"]["mean"] == pytest.approx(np.mean(tuned), abs=1e-9)
    # A results folder whose name holds ':' is still a folder, and DIR:ROW still picks a row.
    odd = tmp_path / "run:1"
    shutil.copytree(out, odd)
    assert sweep.parse_point(f"1={odd}") == ("1", odd, "wgan")
    assert sweep.parse_point(f"1={odd}:bce_continued") == ("1", odd, "bce_continued")


def test_mechanism_record_without_hidden_labels():
    rng = np.random.default_rng(3)
    y = (rng.random((50, 3)) < 0.4).astype(int)
    s = np.clip(0.5 * y + 0.5 * rng.random((50, 3)), 0, 1)
    m = mechanism_record(s, y, s, y)
    assert "subsets" not in m and m["tuned_global"]["threshold"] == _ref_tune(s, y, per_class=False)[0]
    assert m["tuned_per_class"]["threshold_mean"] == pytest.approx(_ref_tune(s, y, per_class=True).mean(), abs=1e-12)
    assert m["tuned_global"]["C-F1"] == pytest.approx(100 * float(_ref_class_prf(s, y, _ref_tune(s, y, False))[2]))
