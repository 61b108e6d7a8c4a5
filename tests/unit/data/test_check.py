"""``fastmlgan check``: finds every kind of planted bad file, and its exit status
says whether training would fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loader_helpers import copy_coco, plant_bad_files

from fastmlgan.commands.check import main
from fastmlgan.data.check import KINDS, inspect_image
from fastmlgan.data.sources.embedded import generate

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("check") / "data", num_train=30, num_val=12, image_size=48, seed=3)


def coco_args(ann, images, val_ann, val_images, *extra) -> list[str]:
    return [
        "--data.dataset", "coco", "--data.train_annotations", str(ann), "--data.train_images", str(images),
        "--data.val_annotations", str(val_ann), "--data.val_images", str(val_images), *extra,
    ]


def run_check(args, tmp_path, capsys) -> tuple[int, dict, str]:
    report_file = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    rc = main(["--threads", "2", "--json", str(report_file), *args])
    out = capsys.readouterr().out
    return rc, json.loads(report_file.read_text()), out


def assert_finds_planted(report: dict, planted: dict[str, str], out: str) -> None:
    for kind, name in planted.items():
        found = report["offenders"][kind]
        assert len(found) == 1 and name in found[0], (kind, found)
        assert name in out
    # Exactly the planted files: nothing else in the training split is flagged.
    assert {k: v for k, v in report["counts"]["train"].items() if v} == {k: 1 for k in planted}


def planted_copy(generated, tmp_path):
    ann, images = copy_coco(generated.train_ann, generated.train_images, tmp_path / "copy")
    return ann, images, plant_bad_files(ann, images)


def test_finds_each_planted_kind_and_fails_for_dali(generated, tmp_path, capsys):
    ann, images, planted = planted_copy(generated, tmp_path)
    args = coco_args(ann, images, generated.val_ann, generated.val_images)
    rc, report, out = run_check([*args, "--data.backend", "dali"], tmp_path, capsys)
    assert rc == 1 and set(report["offenders"]) == set(KINDS)
    assert_finds_planted(report, planted, out)
    assert "training would FAIL" in out and "DALI backend cannot skip" in out
    assert report["counts"]["val"] == {k: 0 for k in KINDS}


def test_exit_status_follows_the_backend_and_policy(generated, tmp_path, capsys):
    ann, images, planted = planted_copy(generated, tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 999_999]
    ann.write_text(json.dumps(data))
    args = coco_args(ann, images, generated.val_ann, generated.val_images)
    rc, report, out = run_check([*args, "--data.backend", "torch"], tmp_path, capsys)
    assert rc == 0 and "training would run (4 bad/missing image(s)" in out  # torch skips them
    assert report["counts"]["train"]["unlabeled"] == 1
    rc, _, out = run_check([*args, "--data.backend", "torch", "--data.on_bad_image", "error"], tmp_path, capsys)
    assert rc == 1 and "on_bad_image is error" in out
    rc, _, _ = run_check([*args, "--data.backend", "dali"], tmp_path, capsys)
    assert rc == 1
    # Nothing wrong: 0 even for DALI.
    clean = coco_args(generated.train_ann, generated.train_images, generated.val_ann, generated.val_images)
    rc, report, _ = run_check([*clean, "--data.backend", "dali"], tmp_path, capsys)
    assert rc == 0 and not any(report["offenders"].values())


def test_list_format_unknown_labels(generated, tmp_path, capsys):
    (tmp_path / "names.txt").write_text("cup\nplate\n")
    names = sorted(os.listdir(generated.train_images))
    (tmp_path / "train.csv").write_text(f"{names[0]},cup\n{names[1]},plate;fork\n{names[2]},\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"path": names[3], "labels": ["spoon"]}) + "\n")
    args = [
        "--data.dataset", "list", "--data.list_train", str(tmp_path / "train.csv"),
        "--data.list_val", str(tmp_path / "val.jsonl"), "--data.label_names", str(tmp_path / "names.txt"),
        "--data.image_root", str(generated.train_images), "--data.backend", "torch",
    ]
    rc, report, out = run_check(args, tmp_path, capsys)
    assert rc == 1
    unknown = report["offenders"]["unknown_label"]
    assert len(unknown) == 2 and "train.csv:2: unknown label 'fork'" in unknown[0] and "'spoon'" in unknown[1]
    assert report["counts"]["train"]["unlabeled"] == 1 and names[2] in report["offenders"]["unlabeled"][0]


def test_inspect_image_markers(generated, tmp_path):
    source = sorted(Path(generated.val_images).glob("*.jpg"))[0]
    raw = source.read_bytes()
    cases = {
        "complete.jpg": raw,
        "trailing.jpg": raw + b"\x00" * 64,  # padding after EOI is fine
        "no_eoi.jpg": raw[:-2],  # the pixels decode, but the end-of-image marker is gone
        "half.jpg": raw[: len(raw) // 2],
        "empty.jpg": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.jpg").mkdir()
    kinds = {name: (inspect_image(str(tmp_path / name)) or ("ok",))[0] for name in [*cases, "folder.jpg"]}
    assert kinds == {
        "complete.jpg": "ok", "trailing.jpg": "ok", "no_eoi.jpg": "truncated", "half.jpg": "truncated",
        "empty.jpg": "unreadable", "folder.jpg": "unreadable",
    }
    assert inspect_image(str(tmp_path / "no_eoi.jpg"), decode=False)[0] == "truncated"
    assert inspect_image(str(tmp_path / "absent.jpg"))[0] == "missing"


@pytest.mark.realdata
def test_finds_planted_files_in_a_copy_of_coco128(shared_data, tmp_path, capsys):
    root = shared_data / "coco128"
    ann, images = copy_coco(root / "instances_coco128.json", root / "images" / "train2017", tmp_path / "copy")
    planted = plant_bad_files(ann, images)
    args = coco_args(ann, images, root / "instances_coco128.json", root / "images" / "train2017", "--data.backend", "dali")
    rc, report, out = run_check(args, tmp_path, capsys)
    assert rc == 1
    # coco128 itself has 2 unlabelled images: the planted one makes 3.
    assert report["counts"]["train"]["unlabeled"] == 3 and report["counts"]["val"]["unlabeled"] == 2
    planted.pop("unlabeled")
    for kind, name in planted.items():
        assert len(report["offenders"][kind]) == 1 and name in report["offenders"][kind][0], kind


def test_command_line(generated, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    shutil.copytree(generated.val_images, tmp_path / "val")
    (tmp_path / "val" / sorted(os.listdir(tmp_path / "val"))[0]).unlink()
    args = coco_args(generated.val_ann, tmp_path / "val", generated.val_ann, generated.val_images, "--first", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastmlgan", "check", *args, "--data.backend", "dali"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1 and "missing: 1" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "fastmlgan", "check", "--data.dataset", "coco"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2 and "needs --data.train_annotations" in proc.stderr
