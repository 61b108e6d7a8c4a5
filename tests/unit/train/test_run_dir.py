"""Runs never mix (issue 10, item 3): a non-empty run directory is refused unless resumed or
overwritten, a run failing before its first step leaves nothing behind, and config.json records
what ran it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fastmlgan.commands import train
from fastmlgan.config import parse_args
from fastmlgan.errors import DataError

REPO = Path(__file__).resolve().parents[3]
# A few steps of each phase on the smoke preset's tiny data.
TINY = ["--preset", "smoke", "--train.bce_epochs", "1", "--train.gan_epochs", "1", "--train.max_steps_per_epoch", "2",
        "--train.log_every", "1", "--log.plots", "false"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data") / "embedded")


def run_train(out: Path, data_root: str, *extra: str) -> int:
    return train.main([*TINY, "--data.root", data_root, "--out", str(out), *extra])


def fake_run(path: Path) -> dict[str, bytes]:
    """A directory holding what a run writes, with known content."""
    files = {"config.json": b'{"preset": "smoke"}\n', "metrics.jsonl": b'{"step": 1}\n', "checkpoints/last.pt": b"weights"}
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return files


def content(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_second_run_into_the_same_directory_is_refused(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    assert run_train(run, data_root) == 0
    before = content(run)
    assert run_train(run, data_root) == 2
    err = capsys.readouterr().err
    assert f"run directory {run} is not empty" in err and "--resume" in err and "--overwrite" in err
    assert content(run) == before  # metrics.jsonl not appended to, nothing rewritten


def test_refused_before_anything_is_built(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    # The refusal comes before the data is touched: the dataset is not even generated.
    assert train.main([*TINY, "--data.root", str(tmp_path / "never"), "--out", str(run)]) == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    # --overwrite does not touch a directory that holds no run.
    assert train.main([*TINY, "--data.root", str(tmp_path / "never"), "--out", str(run), "--overwrite"]) == 2
    assert "holds no fastmlgan run" in capsys.readouterr().err
    assert content(run) == {"notes.txt": b"mine"} and not (tmp_path / "never").exists()


def test_an_empty_or_absent_directory_is_fine(tmp_path, data_root):
    (tmp_path / "empty").mkdir()
    assert run_train(tmp_path / "empty", data_root) == 0
    assert (tmp_path / "empty" / "checkpoints" / "last.pt").is_file()


def test_overwrite_moves_the_old_run_aside(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    run.mkdir()
    old = fake_run(run)
    assert run_train(run, data_root, "--overwrite") == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and content(moved[0]) == old  # nothing deleted
    assert json.loads((run / "config.json").read_text())["preset"] == "smoke"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["phase"] == "bce"  # a fresh log, not the old one
    assert str(moved[0]) in (run / "train.log").read_text()


def test_failure_on_missing_annotations_leaves_nothing(tmp_path, capsys):
    # The case: a run failing on a missing annotation file left a directory with config.json.
    run = tmp_path / "run"
    args = ["--data.dataset", "coco", "--data.train_annotations", str(tmp_path / "nope.json"),
            "--data.train_images", str(tmp_path), "--data.val_annotations", str(tmp_path / "nope.json"),
            "--data.val_images", str(tmp_path), "--out", str(run)]
    assert train.main(args) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not run.exists()


def _fail_in_fit(self):
    raise DataError("planted: the first batch cannot be read")


def test_failure_before_the_first_step_removes_what_it_wrote(tmp_path, data_root, monkeypatch, capsys):
    from fastmlgan.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "fit", _fail_in_fit)
    run = tmp_path / "run"
    assert run_train(run, data_root) == 2
    assert "planted" in capsys.readouterr().err
    assert not run.exists()
    # An empty directory that was there stays, empty.
    (tmp_path / "empty").mkdir()
    assert run_train(tmp_path / "empty", data_root) == 2
    assert list((tmp_path / "empty").iterdir()) == []


def test_failed_overwrite_puts_the_old_run_back(tmp_path, data_root, monkeypatch):
    from fastmlgan.train.trainer import Trainer

    run = tmp_path / "run"
    run.mkdir()
    old = fake_run(run)
    monkeypatch.setattr(Trainer, "fit", _fail_in_fit)
    assert run_train(run, data_root, "--overwrite") == 2
    assert content(run) == old and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_after_steps_keeps_the_run(tmp_path, data_root, monkeypatch):
    from fastmlgan.train.trainer import Trainer

    real_fit = Trainer.fit

    def fit_then_fail(self):
        real_fit(self)
        raise DataError("planted: after training")

    monkeypatch.setattr(Trainer, "fit", fit_then_fail)
    run = tmp_path / "run"
    assert run_train(run, data_root) == 2
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "metrics.jsonl").is_file()
    assert "error: planted: after training" in (run / "train.log").read_text()


def test_config_json_records_the_run_and_is_a_valid_config(tmp_path, data_root):
    run = tmp_path / "run"
    assert run_train(run, data_root, "--gan.gp_weight", "5") == 0
    saved = json.loads((run / "config.json").read_text())
    record = saved["run"]
    assert record["world_size"] == 1 and record["num_nodes"] == 1
    assert record["options"] == [*TINY, "--data.root", data_root, "--out", str(run), "--gan.gp_weight", "5"]
    import torch
    import torchvision

    from fastmlgan import __version__

    versions = record["versions"]
    assert (versions["torch"], versions["torchvision"], versions["fastmlgan"]) == (torch.__version__, torchvision.__version__, __version__)
    assert versions["cuda"] == torch.version.cuda and versions["python"].count(".") == 2
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert record["git_revision"].startswith(head)
    # The run's own config.json as --config: the same config (another --out).
    again = parse_args(["--config", str(run / "config.json"), "--out", "elsewhere"])
    original = parse_args([*TINY, "--data.root", data_root, "--out", str(run), "--gan.gp_weight", "5"])
    assert again.to_dict() == {**original.to_dict(), "out": "elsewhere"}


def test_resume_keeps_the_earlier_run_records(tmp_path, data_root):
    run = tmp_path / "run"
    assert run_train(run, data_root) == 0
    first = json.loads((run / "config.json").read_text())["run"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert train.main(["--resume", str(run), "--train.gan_epochs", "2"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["gan_epochs"] == 2
    assert saved["run"]["options"] == ["--resume", str(run), "--train.gan_epochs", "2"]
    assert saved["run"]["history"] == [first]
    assert (run / "metrics.jsonl").read_text().splitlines()[: len(lines)] == lines  # appended
    assert "resumed from" in (run / "train.log").read_text()
