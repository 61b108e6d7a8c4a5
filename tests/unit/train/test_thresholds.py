"""Thresholds chosen on a validation split carved from the training data (``--data.val_fraction``)
and carried to the checkpoint, ``metrics.json``, ``export``'s sidecar, ``predict`` and ``evaluate``."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from fastmlgan.config import build_config
from fastmlgan.data.holdout import carve_validation, hold_out
from fastmlgan.distributed import DistInfo
from fastmlgan.metrics import THRESHOLD_GRID, choose_thresholds, compute_metrics, metrics_at_thresholds

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
RUN = ["--preset", "smoke", "--train.max_steps_per_epoch", "4", "--data.embedded_num_val", "64", "--log.plots", "false"]


def _c_f1_by_hand(scores, targets, t) -> float:
    """C-F1 of the paper (harmonic mean of the class-averaged P and R) in plain Python."""
    n, c = len(scores), len(scores[0])
    ps, rs = [], []
    for j in range(c):
        pred = [scores[i][j] > t[j] for i in range(n)]
        true = [bool(targets[i][j]) for i in range(n)]
        if not any(true):
            continue
        tp = sum(p and y for p, y in zip(pred, true))
        ps.append(tp / sum(pred) if sum(pred) else 0.0)
        rs.append(tp / sum(true))
    p, r = sum(ps) / len(ps), sum(rs) / len(rs)
    return 100 * 2 * p * r / (p + r) if p + r else 0.0


def test_choose_thresholds_by_brute_force():
    """The global threshold is the grid point of highest C-F1 (ties: nearest 0.5, then lower), each
    per-class one the grid point of highest F1 of its class; the validation C-F1s are those at them."""
    # Classes of unequal frequency (seed 2): C-F1's best global threshold (0.6) is not O-F1's (0.57).
    rng = np.random.default_rng(2)
    targets = (rng.random((60, 4)) < np.array([0.5, 0.3, 0.1, 0.05])).astype(np.float32)
    scores = np.clip(0.35 * targets + rng.random((60, 4)) * 0.6, 0, 1)
    chosen = choose_thresholds(scores, targets)
    s, y = scores.tolist(), targets.tolist()
    grid = sorted(THRESHOLD_GRID.tolist(), key=lambda t: (round(abs(t - 0.5), 9), t))
    best = max(grid, key=lambda t: (_c_f1_by_hand(s, y, [t] * 4), -grid.index(t)))
    assert chosen["global"] == best
    for j in range(4):
        def f1(t, j=j):
            tp = sum(1 for i in range(60) if s[i][j] > t and y[i][j])
            return 2 * tp / (sum(1 for i in range(60) if s[i][j] > t) + sum(y[i][j] for i in range(60)))
        assert chosen["per_class"][j] == max(grid, key=lambda t: (f1(t), -grid.index(t)))
    assert chosen["validation_C-F1"]["global"] == pytest.approx(_c_f1_by_hand(s, y, [best] * 4), abs=1e-9)
    assert chosen["validation_C-F1"]["per_class"] == pytest.approx(_c_f1_by_hand(s, y, chosen["per_class"]), abs=1e-9)
    assert chosen["validation_C-F1"]["0.5"] == pytest.approx(_c_f1_by_hand(s, y, [0.5] * 4), abs=1e-9)
    assert chosen["global"] != 0.5  # the example is not one where tuning changes nothing


def test_the_split_is_the_harness_rule():
    """--data.val_fraction carves the rows ``fastmlgan reproduce`` carves for the same seed."""
    from fastmlgan.data.types import LabeledImages, Splits

    train = LabeledImages("t", [f"{i}.jpg" for i in range(50)], np.eye(5)[np.arange(50) % 5].astype(np.float32), list("abcde"))
    fit_test, val, record = hold_out(Splits(train, train), 0.2, 3)
    fit_idx, val_idx = carve_validation(50, 0.2, 3)
    assert val.paths == [f"{i}.jpg" for i in val_idx] and fit_test.train.paths == [f"{i}.jpg" for i in fit_idx]
    assert record["val_rows"] == 10 and record["fit_rows"] == 40 and fit_test.val is train


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("thresholds") / "embedded"
    embedded.ensure(root, num_train=256, num_val=64, image_size=40, seed=0)
    return root


def _fit(root, out, flip_test_labels: bool, monkeypatch):
    """A short run with a validation split; the test split's labels flipped when asked."""
    import fastmlgan.train.trainer as trainer_module

    real = trainer_module.build_splits

    def splits_with_flipped_test(cfg, info):
        splits = real(cfg, info)
        if flip_test_labels:
            splits.val.labels = 1.0 - splits.val.labels
        return splits

    monkeypatch.setattr(trainer_module, "build_splits", splits_with_flipped_test)
    cfg = build_config({"data.root": str(root), "data.embedded_num_val": "64", "out": str(out), "train.max_steps_per_epoch": "4",
                        "data.val_fraction": "0.25", "log.plots": "false"}, preset="smoke")
    trainer = trainer_module.Trainer(cfg, CPU, out)
    out.mkdir(parents=True, exist_ok=True)
    return trainer, trainer.fit()


def test_thresholds_do_not_change_when_the_test_labels_are_flipped(smoke_root, tmp_path, monkeypatch, capsys):
    """Chosen on the validation split only: a run whose test labels are all flipped chooses the same
    thresholds with the same validation C-F1, while its test metrics differ. The stored thresholds
    are those of an independent recomputation on the validation split; the test metrics at them
    are those of ``compute_metrics`` / ``metrics_at_thresholds`` on the test scores."""
    from fastmlgan.data.factory import build_eval_loader
    from fastmlgan.data.types import Splits
    from fastmlgan.scoring import predict

    trainer, plain = _fit(smoke_root, tmp_path / "plain", False, monkeypatch)
    _, flipped = _fit(smoke_root, tmp_path / "flipped", True, monkeypatch)
    capsys.readouterr()
    for row in ("baseline", "gan"):
        a, b = (r["selection"][row]["weights"]["raw"] for r in (plain, flipped))
        assert a["thresholds"] == b["thresholds"] and a["validation_C-F1"] == b["validation_C-F1"], row
        assert a["test"]["global"]["C-F1"] != b["test"]["global"]["C-F1"], row
    assert plain["selection"]["validation"] == flipped["selection"]["validation"]
    assert plain["gan"] != flipped["gan"]

    # Independently: G of the end of the run on the validation rows carved by the harness's rule.
    record = plain["selection"]["gan"]["weights"]["raw"]
    fit_idx, val_idx = carve_validation(256, 0.25, 0)
    full = trainer.splits.train  # the fit rows
    assert len(full) == len(fit_idx) == 192
    from fastmlgan.data.factory import build_splits

    everything = build_splits(trainer.cfg.data, CPU)
    val = everything.train.subset(val_idx)
    loader = build_eval_loader(trainer.cfg.data, Splits(full, val), CPU, 0)
    scores, targets = predict(trainer.steps.generator, loader, CPU.device)
    expected = choose_thresholds(scores, targets)
    assert record["thresholds"] == {"global": expected["global"], "per_class": expected["per_class"]}
    test_scores, test_targets = predict(trainer.steps.generator, trainer.eval_loader, CPU.device)
    assert record["test"]["global"] == compute_metrics(test_scores, test_targets, expected["global"])
    assert record["test"]["per_class"] == metrics_at_thresholds(test_scores, test_targets, expected["per_class"])


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    from trained_model import restored_logging

    from fastmlgan.commands.train import main

    root = tmp_path_factory.mktemp("tuned")
    with restored_logging():
        assert main([*RUN, "--out", str(root / "run"), "--data.root", str(root / "data"), "--data.val_fraction", "0.25"]) == 0
    return root / "run", root / "data"


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _predict(argv, capsys):
    from trained_model import restored_logging

    from fastmlgan.commands.predict import main

    with restored_logging():
        code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_uses_the_stored_thresholds(tuned_run, tmp_path, capsys):
    """Default: the run's global threshold; ``per-class`` and numbers on request; the checkpoint and
    its export label every image alike."""
    from fastmlgan.commands.export import main as export_main
    from fastmlgan.train import checkpoint as ckpt

    run, data = tuned_run
    state = ckpt.load(run / "checkpoints" / "last.pt")
    stored = state["selection"]["gan"]["weights"]["raw"]["thresholds"]
    names = list(state["class_names"])
    images = [str(p) for p in sorted((data / "val2017").glob("*.jpg"))[:12]]
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "model")]) == 0
    sidecar = json.loads((tmp_path / "model" / "fastmlgan.json").read_text())
    assert sidecar["thresholds"]["global"] == stored["global"] and sidecar["thresholds"]["per_class"] == stored["per_class"]
    assert sidecar["thresholds"]["chosen_on"]["val_rows"] == 64 and sidecar["weights"] == "raw"
    capsys.readouterr()
    for model in (str(run), str(tmp_path / "model")):
        for option, t in (([], [stored["global"]] * len(names)), (["--threshold", "per-class"], stored["per_class"]),
                          (["--threshold", "0.5"], [0.5] * len(names)), (["--threshold", "global"], [stored["global"]] * len(names))):
            code, out, err = _predict([model, *images, "--num-workers", "0", *option], capsys)
            assert code == 0, err
            for row in _rows(out):
                scores = [float(row[n]) for n in names]
                expected = {n for n, s, tc in zip(names, scores, t) if s > tc}
                assert set(filter(None, row["labels"].split(";"))) == expected, (model, option)
    # The per-class thresholds do differ from the global one here, so the cases above tell them apart.
    assert len(set(stored["per_class"])) > 1


def test_evaluate_uses_the_stored_thresholds(tuned_run, capsys):
    from trained_model import restored_logging

    from fastmlgan.commands.evaluate import checkpoint_scores
    from fastmlgan.commands.evaluate import main as evaluate_main
    from fastmlgan.train import checkpoint as ckpt

    run, _ = tuned_run
    stored = ckpt.load(run / "checkpoints" / "last.pt")["selection"]["gan"]["weights"]["raw"]["thresholds"]
    scores, targets = checkpoint_scores(str(run), {})
    results = json.loads((run / "metrics.json").read_text())["selection"]["gan"]["weights"]["raw"]["test"]
    for option, expected in (([], compute_metrics(scores, targets, stored["global"])),
                             (["--threshold", "per-class"], metrics_at_thresholds(scores, targets, stored["per_class"])),
                             (["--threshold", "0.5"], compute_metrics(scores, targets))):
        with restored_logging():
            assert evaluate_main(["--checkpoint", str(run), "--json", *option]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got == expected, option
    assert results["global"] == compute_metrics(scores, targets, stored["global"])


def test_a_model_without_thresholds_falls_back_to_one_half_with_one_log_line(tmp_path_factory, tmp_path, capsys):
    """A run without a validation split, or an export from before (no ``thresholds`` in its
    sidecar): 0.5, said once on stderr; asking for ``global`` is a one-line error."""
    from trained_model import embedded_val_images, smoke_run

    from fastmlgan.commands.export import main as export_main

    run = smoke_run(tmp_path_factory)
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "m")]) == 0
    sidecar_path = tmp_path / "m" / "fastmlgan.json"
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["thresholds"] is None
    del sidecar["thresholds"], sidecar["weights"]  # as an earlier fastmlgan wrote it
    sidecar_path.write_text(json.dumps(sidecar))
    image = embedded_val_images(run)[0]
    capsys.readouterr()
    for model in (str(run), str(tmp_path / "m")):
        code, out, err = _predict([model, image, "--num-workers", "0"], capsys)
        assert code == 0
        notes = [line for line in err.splitlines() if "carries no thresholds" in line]
        assert len(notes) == 1 and "0.5" in notes[0]
        row = _rows(out)[0]
        names = [k for k in row if k not in ("path", "labels", "error")]
        assert set(filter(None, row["labels"].split(";"))) == {n for n in names if float(row[n]) > 0.5}
        code, out, err = _predict([model, image, "--threshold", "global"], capsys)
        assert code == 2 and out == "" and err.strip().startswith("error: --threshold global:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [({"global": 1.5}, "'thresholds.global' must be a number in [0, 1]"),
     ({"per_class": [0.5]}, "'thresholds.per_class' must be 16 numbers in [0, 1]"),
     ({"default": "best"}, "'thresholds.default' must be global or per_class")],
)
def test_a_sidecar_with_bad_thresholds_is_one_line(tuned_run, tmp_path, capsys, change, message):
    from fastmlgan.commands.export import main as export_main

    run, data = tuned_run
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "m")]) == 0
    path = tmp_path / "m" / "fastmlgan.json"
    sidecar = json.loads(path.read_text())
    sidecar["thresholds"].update(change)
    path.write_text(json.dumps(sidecar))
    capsys.readouterr()
    image = str(sorted((data / "val2017").glob("*.jpg"))[0])
    code, out, err = _predict([str(tmp_path / "m"), image], capsys)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_bad_threshold_words_are_one_line(tuned_run, capsys):
    run, data = tuned_run
    image = str(sorted((data / "val2017").glob("*.jpg"))[0])
    for value, message in (("best", "--threshold must be a number in [0, 1], global or per-class, got 'best'"),
                           ("nan", "--threshold must be in [0, 1], got nan")):
        code, out, err = _predict([str(run), image, "--threshold", value], capsys)
        assert code == 2 and err.strip() == f"error: {message}"


def _record(chosen, raw, ema=None, t=(0.4, 0.3)):
    def entry(scores):
        if scores is None:
            return {"thresholds": None, "validation_C-F1": None}
        return {"thresholds": {"global": t[0], "per_class": [t[1]]},
                "validation_C-F1": dict(zip(("0.5", "global", "per_class"), scores))}

    weights = {"raw": entry(raw)} | ({"ema": entry(ema)} if ema is not None else {})
    return {"weights": weights, "chosen": chosen, "default_threshold": "global"}


class _Records:
    def __init__(self, records):
        self.records = records


def test_best_on_validation_by_hand():
    """The row, weights and threshold of highest validation C-F1, among the weights predict loads
    (the chosen ones); ties to the earlier row and threshold; nothing without a validation split."""
    from fastmlgan.train.selection import best_on_validation

    names = {"baseline": "smallcnn", "gan": "+ WGAN-gp"}
    sel = _Records({"baseline": _record("raw", (60.0, 64.0, 63.0)), "gan": _record("raw", (61.0, 63.5, 65.0))})
    assert best_on_validation(sel, names) == {"row": "gan", "name": "+ WGAN-gp @ per-class", "threshold": "per-class",
                                              "validation_C-F1": 65.0}
    # The EMA weights are not chosen for the baseline: their higher score is not what predict would load.
    sel = _Records({"baseline": _record("raw", (60.0, 66.0, 63.0), ema=(70.0, 71.0, 72.0)),
                    "gan": _record("raw", (61.0, 63.5, 65.0))})
    assert best_on_validation(sel, names)["name"] == "smallcnn @ 0.40"
    sel = _Records({"baseline": _record("ema", (60.0, 66.0, 63.0), ema=(70.0, 66.0, 62.0), t=(0.35, 0.3)),
                    "gan": _record("raw", (61.0, 66.0, 65.0))})
    # 70.0 at 0.5 (the chosen EMA weights) beats every tuned score.
    assert best_on_validation(sel, names) == {"row": "baseline", "name": "smallcnn (EMA)", "threshold": "0.5",
                                              "validation_C-F1": 70.0}
    sel = _Records({"baseline": _record("raw", (62.0, 62.0, 61.0)), "gan": _record("raw", (62.0, 62.0, 62.0))})
    assert best_on_validation(sel, names) == {"row": "baseline", "name": "smallcnn", "threshold": "0.5", "validation_C-F1": 62.0}
    assert best_on_validation(_Records({"baseline": _record("raw", None)}), names) is None
    assert best_on_validation(None, names) is None


def test_the_run_names_its_best_recipe_and_the_predict_command(smoke_root, tmp_path, capsys):
    """The final table is followed by one line: the best row on the validation split (from the
    run's own metrics.json) and the predict command that labels images with it."""
    from trained_model import restored_logging

    from fastmlgan.commands.train import main

    out = tmp_path / "run"
    with restored_logging():
        assert main([*RUN, "--out", str(out), "--data.root", str(smoke_root), "--data.val_fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    records = json.loads((out / "metrics.json").read_text())["selection"]
    best = max(((row, key, records[row]["weights"]["raw"]["validation_C-F1"][key]) for row in ("baseline", "gan")
                for key in ("0.5", "global", "per_class")), key=lambda c: c[2])  # first of the highest: as the rule
    row, key, score = best
    checkpoint = out / "checkpoints" / ("baseline.pt" if row == "baseline" else "last.pt")
    threshold = {"0.5": "0.5", "global": "global", "per_class": "per-class"}[key]
    line = next(x for x in printed.splitlines() if x.startswith("best recipe on the validation split: "))
    assert f"(validation C-F1 {score:.2f}); fastmlgan predict {checkpoint} --threshold {threshold} IMAGES" in line
    assert line.split(": ", 1)[1].startswith("smallcnn" if row == "baseline" else "+ WGAN-gp")
