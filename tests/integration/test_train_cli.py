"""The training command end to end on the smoke preset: outputs, re-evaluation, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from extras import import_extra

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
KEYS = {"C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1", "mAP", "avg_labels", "top3"}


def _run(module: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    run = tmp / "run"
    # Through the `fastmlgan` command (python -m fastmlgan train); TensorBoard where installed (the tb extra).
    tensorboard = ["--log.tensorboard"] if _installed("tensorboard") else []
    proc = _run("fastmlgan", ["train", "--preset", "smoke", "--out", str(run), "--data.root", str(tmp / "data"), *tensorboard], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, run, proc


def test_outputs(smoke_run):
    tmp, run, proc = smoke_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert KEYS <= set(metrics["baseline"]) and KEYS <= set(metrics["gan"])
    assert set(metrics["gan"]["top3"]) == {"C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1"}
    # The paper's table: a header and the two rows.
    assert "C-P" in proc.stdout and "O-F1" in proc.stdout and "+ WGAN-gp" in proc.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "smoke" and config["gan"]["gp_weight"] == 10.0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r.get("split") == "val"]
    assert [r["phase"] for r in evals] == ["bce", "bce", "gan"]
    assert any("loss_d" in r and "gp" in r for r in lines)  # phase-2 losses were logged


def test_checkpoint_reevaluates_to_the_same_metrics(smoke_run):
    tmp, run, _ = smoke_run
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["phase"] == "done" and state["feature_extractor_source"] == "phase1"
    for name, row in (("baseline.pt", "baseline"), ("last.pt", "gan")):
        proc = _run("fastmlgan.commands.evaluate", ["--checkpoint", str(run / "checkpoints" / name), "--json"], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        again = json.loads(proc.stdout)  # stdout holds the JSON object alone
        expected = json.loads((run / "metrics.json").read_text())[row]
        for key in ("C-F1", "O-F1", "mAP", "avg_labels"):
            assert again[key] == pytest.approx(expected[key], abs=1e-4), (name, key)


def test_resume_continues(smoke_run, tmp_path):
    tmp, run, _ = smoke_run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "metrics.jsonl").read_text().splitlines()
    proc = _run("fastmlgan.train", ["--resume", str(copy), "--train.gan_epochs", "2"], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = (copy / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # appended, nothing lost
    evals = [json.loads(line) for line in after[len(before):] if '"split"' in line]
    assert [(r["phase"], r["epoch"]) for r in evals] == [("gan", 2)]
    state = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    assert state["phase"] == "done" and state["config"]["train"]["gan_epochs"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data.dataset", "coco", "--data.train_annotations", "nope.json", "--data.train_images", "x",
          "--data.val_annotations", "nope.json", "--data.val_images", "x"], "nope.json"),
        (["--gan.gp_wieght", "1"], "unknown option --gan.gp_wieght"),
        (["--preset", "imagenet"], "unknown preset"),
        (["--data.dataset", "coco"], "--data.train_annotations"),
        (["--resume", "nowhere"], "checkpoint nowhere"),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(tmp_path, args, message):
    proc = _run("fastmlgan.train", args, tmp_path, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_annotation_json(tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text("{not json")
    (tmp_path / "img").mkdir()
    args = ["--data.dataset", "coco", "--data.train_annotations", str(bad), "--data.train_images", str(tmp_path / "img"),
            "--data.val_annotations", str(bad), "--data.val_images", str(tmp_path / "img")]
    proc = _run("fastmlgan.train", args, tmp_path, timeout=120)
    assert proc.returncode == 2 and "ann.json" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_accepts_a_checkpoint_file(smoke_run, tmp_path):
    tmp, run, _ = smoke_run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    proc = _run("fastmlgan.train", ["--resume", str(copy / "checkpoints" / "last.pt"), "--train.gan_epochs", "2"], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert torch.load(copy / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


def test_trim_metrics_log(tmp_path):
    from fastmlgan.train.rundir import trim_metrics_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 5, "split": "val"}\n{"step": 6}\n{"step": 7')  # torn last line
    assert trim_metrics_log(log, 5) == 2
    assert log.read_text() == '{"step": 1}\n{"step": 5, "split": "val"}\n'


def test_feature_dataset_train_and_reevaluate(tmp_path):
    # An MLP generator on feature vectors: train, then fastmlgan evaluate reproduces the metrics.
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("test", 80)):
        x = rng.normal(size=(n, 6)).astype(np.float32)
        y = np.stack([x[:, 0] > 0, x[:, 1] > 0, (x[:, 0] > 0) & (x[:, 2] > 0)], axis=1).astype(np.uint8)
        np.savez(tmp_path / f"{split}.npz", X=x, Y=y)
    run = tmp_path / "run"
    args = ["--data.dataset", "features", "--model.backbone", "mlp", "--model.width", "16",
            "--data.features_train", str(tmp_path / "train.npz"), "--data.features_test", str(tmp_path / "test.npz"),
            "--data.batch_size", "16", "--gan.hidden_dim", "16", "--gan.proj_dim", "8", "--gan.num_layers", "2",
            "--train.bce_epochs", "3", "--train.gan_epochs", "1", "--optim.bce_lr", "1e-2", "--out", str(run),
            "--data.val_fraction", "0"]  # all 160 rows train (the default preset holds out a fifth)
    proc = _run("fastmlgan.train", args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = json.loads((run / "metrics.json").read_text())["gan"]
    assert expected["num_images"] == 80 and expected["num_classes"] == 3
    proc = _run("fastmlgan.commands.evaluate", ["--checkpoint", str(run), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    for key in ("C-F1", "O-F1", "mAP"):
        assert again[key] == pytest.approx(expected[key], abs=1e-4)


# ---------------------------------------------------------------- issue 10: seeing a run


def test_train_log_holds_what_rank_0_logged(smoke_run):
    tmp, run, proc = smoke_run
    log = (run / "train.log").read_text()
    # Everything the loggers printed, the records logged before the directory existed included.
    logged = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if " INFO " in line]
    assert logged and all(line in log for line in logged)
    assert "generating embedded dataset" in log and "run directory" in log
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"split"' not in line]
    assert all(f" step {step}: " in log for step in steps)  # the loss records
    assert "+ WGAN-gp" in log and "per class" in log  # the final tables


def test_metrics_json_has_the_per_class_table(smoke_run):
    tmp, run, proc = smoke_run
    metrics = json.loads((run / "metrics.json").read_text())
    per_class = metrics["per_class"]
    assert per_class["model"] == "+ WGAN-gp" and per_class["threshold"] == 0.5
    assert [c["class"] for c in per_class["classes"]] == metrics["class_names"]
    # The final generator's table: its averages are the final row's class metrics.
    evaluated = [c for c in per_class["classes"] if c["positives"] > 0]
    assert len(evaluated) == metrics["gan"]["num_classes_evaluated"]
    assert sum(c["positives"] for c in per_class["classes"]) > 0
    for key, summary in (("P", "C-P"), ("R", "C-R"), ("AP", "mAP")):
        mean = sum(c[key] for c in evaluated) / len(evaluated)
        assert mean == pytest.approx(metrics["gan"][summary], abs=1e-6), key
    assert "per class, the final generator (threshold 0.5)" in proc.stdout
    assert proc.stdout.count("+ WGAN-gp") == 1  # the row name once: in the paper's table


def test_img_per_s_in_every_log_step(smoke_run):
    tmp, run, _ = smoke_run
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"split"' not in line]
    # A fresh run knows its start (step 0), so every log line has its throughput.
    assert steps and all(r["img_per_s"] > 0 for r in steps)


def test_curves_png(smoke_run):
    import_extra("plots", "matplotlib")  # without it the run writes no curves.png
    import matplotlib.image

    tmp, run, _ = smoke_run
    assert matplotlib.image.imread(run / "curves.png").shape[:2] == (360, 1300)


def test_tensorboard_scalars(smoke_run):
    import_extra("tb", "tensorboard")  # without it the run was started without --log.tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, run, _ = smoke_run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    bce = [(r["step"], r["bce"]) for r in records if "bce" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("loss/bce")] == bce
    f1 = [(r["step"], r["C-F1"]) for r in records if r.get("split") == "val"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("val/C-F1")] == f1
    assert {"speed/img_per_s", "speed/data_wait_frac", "loss/loss_d", "loss/gp"} <= set(events.Tags()["scalars"])


def test_evaluate_output_for_people_and_for_scripts(smoke_run, capsys):
    from fastmlgan.commands import evaluate

    tmp, run, _ = smoke_run
    assert evaluate.main(["--checkpoint", str(run)]) == 0
    people = capsys.readouterr()
    assert "C-F1" in people.out and "{" not in people.out  # the table, no JSON
    assert evaluate.main(["--checkpoint", str(run), "--json"]) == 0
    scripts = capsys.readouterr()
    metrics = json.loads(scripts.out)  # the whole of stdout is one JSON object
    assert metrics["C-F1"] == pytest.approx(json.loads((run / "metrics.json").read_text())["gan"]["C-F1"], abs=1e-4)
    assert "C-F1" in scripts.err  # the table went to stderr
