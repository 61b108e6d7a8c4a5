"""``fastmlgan check`` surprises of issue 10: no arguments, and a COCO training split on its own."""

from __future__ import annotations

import json

import pytest
from loader_helpers import copy_coco, plant_bad_files

from fastmlgan.commands.check import main
from fastmlgan.data.sources.embedded import generate


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("check-cli") / "data", num_train=24, num_val=10, image_size=40, seed=5)


def test_no_arguments_prints_usage_and_generates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastmlgan check") and "error: name the dataset to check" in err
    assert list(tmp_path.iterdir()) == []  # no data/embedded generated
    # Options that say nothing about the data do not count either.
    assert main(["--threads", "2", "--no-decode"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_coco_training_split_alone(generated, tmp_path, capsys):
    ann, images = copy_coco(generated.train_ann, generated.train_images, tmp_path / "copy")
    planted = plant_bad_files(ann, images)
    report_file = tmp_path / "report.json"
    args = ["--threads", "2", "--json", str(report_file), "--data.dataset", "coco",
            "--data.train_annotations", str(ann), "--data.train_images", str(images), "--data.backend", "dali"]
    assert main(args) == 1  # the planted files fail a DALI run
    report = json.loads(report_file.read_text())
    assert list(report["counts"]) == ["train"] and report["num_images"]["train"] == 24
    assert {k: v for k, v in report["counts"]["train"].items() if v} == {k: 1 for k in planted}
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["train", "24"] and "\nval " not in out


def test_an_evaluation_split_alone_and_half_a_split(generated, tmp_path, capsys):
    report_file = tmp_path / "report.json"
    args = ["--threads", "2", "--json", str(report_file), "--data.dataset", "coco",
            "--data.val_annotations", str(generated.val_ann), "--data.val_images", str(generated.val_images)]
    assert main(args) == 0
    assert json.loads(report_file.read_text())["num_images"] == {"val": 10}
    capsys.readouterr()
    assert main(["--data.dataset", "coco", "--data.train_annotations", str(generated.train_ann)]) == 2
    assert "the train split needs --data.train_images too" in capsys.readouterr().err
