"""What a run leaves to look at (fastmlgan.train.runlog) and the per-class metrics (issue 10, item 4/5)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from extras import import_extra

from fastmlgan.errors import ConfigError, DataError
from fastmlgan.metrics import compute_metrics, format_per_class, per_class_metrics
from fastmlgan.train import runlog
from fastmlgan.train.runlog import LogFile, RunLog, plot_curves, scalar_tags

REPO = Path(__file__).resolve().parents[3]

# 4 images x 3 classes; class 2 has no positive target.
SCORES = np.array([[0.9, 0.2, 0.6], [0.4, 0.8, 0.1], [0.7, 0.65, 0.2], [0.1, 0.6, 0.3]])
TARGETS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])


def test_per_class_by_hand():
    rows = per_class_metrics(SCORES, TARGETS, ["cat", "dog", "kite"])
    by_name = {r["class"]: r for r in rows}
    # cat: predicted on images 0 and 2, positives 0 and 1 -> TP 1: P 1/2, R 1/2.
    # Ranking 0.9(+) 0.7(-) 0.4(+) 0.1(-): AP = (1/1 + 2/3) / 2.
    cat = by_name["cat"]
    assert (cat["positives"], cat["predicted"]) == (2, 2)
    assert cat["P"] == pytest.approx(50.0) and cat["R"] == pytest.approx(50.0) and cat["F1"] == pytest.approx(50.0)
    assert cat["AP"] == pytest.approx(100 * 5 / 6)
    # dog: predicted on 1, 2, 3 (0.8, 0.65, 0.6), positives 1 and 2 -> P 2/3, R 1, F1 0.8;
    # ranking 0.8(+) 0.65(+) 0.6(-) 0.2(-): AP 1.
    dog = by_name["dog"]
    assert (dog["positives"], dog["predicted"]) == (2, 3)
    assert dog["P"] == pytest.approx(200 / 3) and dog["R"] == pytest.approx(100.0)
    assert dog["F1"] == pytest.approx(80.0) and dog["AP"] == pytest.approx(100.0)
    # kite: no positive target. Reported, not dropped: its one prediction is wrong (P 0), the rest undefined.
    kite = by_name["kite"]
    assert (kite["positives"], kite["predicted"], kite["P"]) == (0, 1, 0.0)
    assert kite["R"] is None and kite["F1"] is None and kite["AP"] is None and "no positive target" in kite["note"]
    assert [r["index"] for r in rows] == [0, 1, 2]


def test_per_class_averages_are_the_class_metrics():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((60, 6)), 1)
    targets = (rng.random((60, 6)) < 0.3).astype(int)
    targets[:, 4] = 0
    rows = per_class_metrics(scores, targets, threshold=0.4)
    summary = compute_metrics(scores, targets, threshold=0.4)
    evaluated = [r for r in rows if r["positives"]]
    assert len(evaluated) == summary["num_classes_evaluated"] == 5
    assert np.mean([r["P"] for r in evaluated]) == pytest.approx(summary["C-P"], abs=1e-9)
    assert np.mean([r["R"] for r in evaluated]) == pytest.approx(summary["C-R"], abs=1e-9)
    assert np.mean([r["AP"] for r in evaluated]) == pytest.approx(summary["mAP"], abs=1e-9)
    assert [r["class"] for r in rows] == ["0", "1", "2", "3", "4", "5"]


def test_per_class_bad_input():
    with pytest.raises(DataError, match="2 class names for 3 classes"):
        per_class_metrics(SCORES, TARGETS, ["a", "b"])


def test_format_per_class_marks_classes_without_positives():
    text = format_per_class(per_class_metrics(SCORES, TARGETS, ["cat", "dog", "kite"]), title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and lines[1].split() == ["class", "pos", "pred", "P", "R", "F1", "AP"]
    assert lines[3].split() == ["cat", "2", "2", "50.0", "50.0", "50.0", "83.3"]
    assert lines[5].split() == ["kite", "0", "1", "0.0", "-", "-", "-"]
    assert lines[6].startswith("1 of 3 classes have no positive target (kite)")


# ---------------------------------------------------------------- the metrics command line


def _metrics_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastmlgan", "metrics", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_metrics_cli_says_which_classes_have_no_positives(tmp_path):
    np.save(tmp_path / "s.npy", SCORES)
    np.save(tmp_path / "t.npy", TARGETS)
    (tmp_path / "names.txt").write_text("cat\ndog\nkite\n")
    done = _metrics_cli(str(tmp_path / "s.npy"), str(tmp_path / "t.npy"))
    assert done.returncode == 0, done.stderr
    assert "note: 1 of 3 classes have no positive target (column 2)" in done.stderr
    assert json.loads(done.stdout)["num_classes_evaluated"] == 2  # stdout: the JSON alone
    done = _metrics_cli(str(tmp_path / "s.npy"), str(tmp_path / "t.npy"), "--per-class", "--class-names", str(tmp_path / "names.txt"))
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["per_class"]
    assert rows == json.loads(json.dumps(per_class_metrics(SCORES, TARGETS, ["cat", "dog", "kite"])))
    # Every class with positives: no note.
    targets = TARGETS.copy()
    targets[0, 2] = 1
    np.save(tmp_path / "t2.npy", targets)
    done = _metrics_cli(str(tmp_path / "s.npy"), str(tmp_path / "t2.npy"))
    assert done.returncode == 0 and "note" not in done.stderr


# ---------------------------------------------------------------- metrics.jsonl, img/s, TensorBoard


class FakeClock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def step_record(step, epoch=1, **losses):
    return {"phase": "bce", "epoch": epoch, "step": step, "bce": 1.0, **losses, "data_wait_frac": 0.1, "bad_images": 0}


def test_images_per_second_by_hand(tmp_path, monkeypatch):
    log = RunLog(tmp_path, start_step=0)
    monkeypatch.setattr(runlog.time, "perf_counter", FakeClock([110.0, 115.0, 134.0]))
    first, second, third = step_record(5), step_record(10), step_record(12, epoch=2)
    log.write(first, epoch_start=100.0, images_per_step=32)  # 5 steps x 32 images in 10 s
    log.write(second, epoch_start=100.0, images_per_step=32)  # 5 steps in 5 s
    log.write({"phase": "bce", "epoch": 1, "step": 10, "split": "val", "C-F1": 1.0}, None, 0)
    # A new epoch starting at 130 (evaluation and checkpoint in between): 2 steps in 4 s.
    log.write(third, epoch_start=130.0, images_per_step=32)
    assert [first["img_per_s"], second["img_per_s"], third["img_per_s"]] == [16.0, 32.0, 16.0]
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("img_per_s") for r in written] == [16.0, 32.0, None, 16.0]


def test_images_per_second_unknown_start(tmp_path, monkeypatch):
    # Without the step the process started from, the first line has no rate (never a wrong one).
    log = RunLog(tmp_path)
    monkeypatch.setattr(runlog.time, "perf_counter", FakeClock([10.0, 12.0]))
    first, second = step_record(7), step_record(9)
    log.write(first, epoch_start=0.0, images_per_step=8)
    log.write(second, epoch_start=0.0, images_per_step=8)
    assert "img_per_s" not in first and second["img_per_s"] == 8.0


def test_scalar_tags():
    record = {"phase": "gan", "epoch": 1, "step": 9, "loss_d": 2.5, "gp": 0.5, "data_wait_frac": 0.25,
              "bad_images": 1, "img_per_s": 80.0}
    assert scalar_tags(record) == {"loss/loss_d": 2.5, "loss/gp": 0.5, "speed/data_wait_frac": 0.25,
                                   "speed/img_per_s": 80.0, "data/bad_images": 1.0}
    val = {"phase": "gan", "epoch": 1, "step": 9, "split": "val", "C-F1": 30.0, "mAP": 40.0, "num_images": 5,
           "top3": {"O-F1": 20.0}}
    assert scalar_tags(val) == {"val/C-F1": 30.0, "val/mAP": 40.0, "val_top3/O-F1": 20.0}


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path, monkeypatch):
    import_extra("tb", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, tensorboard=True, start_step=0)
    monkeypatch.setattr(runlog.time, "perf_counter", FakeClock([2.0, 4.0]))
    log.write(step_record(4, bce=0.75), epoch_start=0.0, images_per_step=16)
    log.write(step_record(8, bce=0.5), epoch_start=0.0, images_per_step=16)
    log.write({"phase": "bce", "epoch": 1, "step": 8, "split": "val", "C-F1": 12.5, "O-F1": 20.0})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["loss/bce"] == [(4, 0.75), (8, 0.5)]
    assert scalars["speed/img_per_s"] == [(4, 32.0), (8, 32.0)]  # 4 steps x 16 images in 2 s, twice
    assert scalars["val/C-F1"] == [(8, 12.5)] and scalars["val/O-F1"] == [(8, 20.0)]
    assert scalars["speed/data_wait_frac"] == [(4, pytest.approx(0.1)), (8, pytest.approx(0.1))]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match=r"--log.tensorboard true needs the tensorboard package: pip install 'fastmlgan\[tb\]'"):
        RunLog(tmp_path, tensorboard=True)


def test_log_file_keeps_lines_until_the_directory_exists(tmp_path):
    handler = LogFile()
    log = logging.getLogger("fastmlgan.test_runlog")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("before the run directory")
        handler.write_line("a table line")
        assert not (tmp_path / "train.log").exists()
        handler.open(tmp_path / "train.log")
        log.info("after")
        log.debug("below the level")
    finally:
        log.removeHandler(handler)
        handler.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 3 and lines[0].endswith("INFO fastmlgan.test_runlog: before the run directory")
    assert lines[1] == "a table line" and lines[2].endswith(": after")


# ---------------------------------------------------------------- curves.png


RECORDS = [
    {"phase": "bce", "epoch": 1, "step": 5, "loss_g": 3.0, "bce": 3.0, "data_wait_frac": 0.1, "bad_images": 0, "img_per_s": 9.0},
    {"phase": "bce", "epoch": 1, "step": 10, "loss_g": 2.0, "bce": 2.0, "data_wait_frac": 0.1, "bad_images": 0},
    {"phase": "bce", "epoch": 1, "step": 10, "split": "val", "C-F1": 10.0, "O-F1": 20.0, "mAP": 5.0},
    {"phase": "gan", "epoch": 1, "step": 11, "loss_d": 4.0, "wasserstein": 0.5, "gp": 0.25, "loss_g": 30.0,
     "bce": 1.5, "g_adversarial": 0.1, "data_wait_frac": 0.2, "bad_images": 0},
    {"phase": "gan", "epoch": 1, "step": 11, "split": "val", "C-F1": 12.0, "O-F1": 22.0},
]


def test_curves_plot_the_logged_values(tmp_path):
    import_extra("plots", "matplotlib")
    import matplotlib.image

    series = plot_curves(RECORDS, tmp_path / "curves.png")
    assert series == {
        "generator": {"bce": ([5, 10, 11], [3.0, 2.0, 1.5]), "g_adversarial": ([11], [0.1])},
        "discriminator": {"wasserstein": ([11], [0.5]), "gp": ([11], [0.25]), "loss_d": ([11], [4.0])},
        "f1": {"C-F1": ([10, 11], [10.0, 12.0]), "O-F1": ([10, 11], [20.0, 22.0])},
    }
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[:2] == (360, 1300)


def test_curves_without_matplotlib_skip_with_a_log_line(tmp_path, monkeypatch, caplog):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.INFO, logger="fastmlgan.train.runlog"):
        assert RunLog(tmp_path).draw_curves() is None
    assert not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed: no curves.png" in caplog.text


def test_finish_adds_the_per_class_table_to_metrics_json(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    handler = LogFile()
    handler.open(tmp_path / "train.log")
    results = {"baseline": {"C-F1": 1.0}, "gan": None, "class_names": ["cat", "dog", "kite"]}
    out = RunLog(tmp_path, plots=False, log_file=handler).finish(
        results, SCORES, TARGETS, ["cat", "dog", "kite"], model="smallcnn", summary="THE TABLE"
    )
    handler.close()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(out)) and saved["baseline"] == {"C-F1": 1.0}
    assert saved["per_class"]["model"] == "smallcnn" and saved["per_class"]["num_without_positives"] == 1
    assert saved["per_class"]["classes"] == json.loads(json.dumps(per_class_metrics(SCORES, TARGETS, ["cat", "dog", "kite"])))
    printed = capsys.readouterr().out
    assert "per class, the final generator (threshold 0.5)" in printed and "kite" in printed
    log = (tmp_path / "train.log").read_text()
    assert "THE TABLE" in log and "1 of 3 classes have no positive target" in log
    assert not (tmp_path / "curves.png").exists()  # --log.plots false


def test_git_revision(tmp_path):
    assert runlog.git_revision(tmp_path) is None  # not a checkout
    if not (REPO / ".git").exists():
        pytest.skip("not run from a git checkout")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert runlog.git_revision(REPO).split("-")[0] == head
