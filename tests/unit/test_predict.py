"""``fastmlgan predict``: the same scores as evaluation, label choice, output formats, inputs, errors."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trained_model import (
    coco128_images,
    embedded_val_images,
    reference_generator,
    restored_logging,
    smoke_run,
    truncated_jpeg,
)

from fastmlgan.classifier import preprocess_image
from fastmlgan.commands import predict

# One smoke-preset training per session (~15 s on 2 busy cores) feeds every test here.
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# Predict and evaluation run the same fp32 ops on the same inputs; only the batch composition
# differs, which on the CPU changed no score by more than 1.2e-7 (measured on the smoke model's
# 128 evaluation images with batches of 1, 24 and 128). On a GPU (TF32 convolutions, another
# cuDNN algorithm per batch size) allow 1e-3. A centre crop planted in preprocessing failed both tests.
ATOL = 1e-6 if not torch.cuda.is_available() else 1e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def class_names(run) -> list[str]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["class_names"]


def _predict(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # only this call's output (a fixture's training run may have logged before it)
    with restored_logging():
        code = predict.main([*argv, "--num-workers", "0"])
    out, err = capsys.readouterr()
    return code, out, err


def _csv_rows(text: str) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames), list(reader)


def _scores(row: dict, class_names: list[str]) -> np.ndarray:
    return np.array([np.float32(row[c]) for c in class_names], dtype=np.float32)


def test_scores_equal_evaluate_on_the_embedded_split(run, class_names, tmp_path, capsys):
    """predict on the run's evaluation images gives fastmlgan evaluate's σ(G(x)), image by image."""
    from fastmlgan.commands.evaluate import checkpoint_scores

    # The torch backend and fp32: evaluate's GPU defaults (DALI decode, bf16) are another geometry/precision.
    expected, _ = checkpoint_scores(str(run), {"data.backend": "torch", "precision.amp": "none"})
    paths = embedded_val_images(run)
    assert len(paths) == len(expected) == 64
    out_file = tmp_path / "rows.jsonl"
    code, out, _ = _predict([str(run), *paths, "--format", "jsonl", "--out", str(out_file), "--batch-size", "24"], capsys)
    assert code == 0 and out == ""  # rows went to --out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["path"] for r in rows] == paths
    got = np.array([[r["scores"][c] for c in class_names] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert got.std() > 1e-3  # a trained G: scores that differ between images and classes


@pytest.mark.realdata
def test_scores_equal_the_evaluation_loader_on_coco128(run, class_names, shared_data, capsys):
    """Real JPEGs (up to 640 px, either orientation, one greyscale) through evaluation's own
    dataset and loader (FiveCropDataset in eval mode + trainer.predict) and through predict."""
    from fastmlgan.data.backends.torch_dataloader import FiveCropDataset, build_eval_loader
    from fastmlgan.data.types import LabeledImages
    from fastmlgan.scoring import predict as trainer_predict

    paths = coco128_images(shared_data, 20)
    image_size = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]["data"]["image_size"]
    images = LabeledImages("coco128", paths, np.zeros((len(paths), len(class_names)), np.uint8), class_names)
    loader = build_eval_loader(FiveCropDataset(images, image_size, train=False, on_bad_image="error"), 8, 0, 1)
    g = reference_generator(run / "checkpoints" / "last.pt")
    expected, _ = trainer_predict(g, loader, torch.device("cpu"))

    code, out, _ = _predict([str(run), *paths, "--device", "cpu", "--batch-size", "16"], capsys)
    assert code == 0
    header, rows = _csv_rows(out)
    assert header == ["path", "labels", "error", *class_names]
    assert [r["path"] for r in rows] == paths
    got = np.stack([_scores(r, class_names) for r in rows])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_labels_by_threshold_and_top_k_by_hand():
    names = ["a", "b", "c", "d", "e"]
    scores = np.array([0.2, 0.7, 0.5, 0.9, 0.7], dtype=np.float32)
    # Strictly above the threshold (0.5 is not), highest first, the 0.7 tie in class order.
    assert predict.select_labels(scores, names, 0.5, None) == ["d", "b", "e"]
    assert predict.select_labels(scores, names, 0.0, None) == ["d", "b", "e", "c", "a"]
    assert predict.select_labels(scores, names, 0.95, None) == []
    assert predict.select_labels(scores, names, None, 1) == ["d"]
    assert predict.select_labels(scores, names, None, 2) == ["d", "b"]
    assert predict.select_labels(scores, names, None, 3) == ["d", "b", "e"]


def _labels_by_hand(scores: np.ndarray, names: list[str], threshold=None, k=None) -> list[str]:
    ranked = sorted(range(len(names)), key=lambda c: (-float(scores[c]), c))
    return [names[c] for c in (ranked[:k] if k else [c for c in ranked if scores[c] > threshold])]


def test_rows_carry_the_labels_of_their_own_scores(run, class_names, capsys):
    paths = embedded_val_images(run)[:12]
    for option, value in (("--threshold", "0.45"), ("--top-k", "3")):
        code, out, _ = _predict([str(run), *paths, option, value], capsys)
        assert code == 0
        rows = _csv_rows(out)[1]
        for row in rows:
            scores = _scores(row, class_names)
            if option == "--top-k":
                expected = _labels_by_hand(scores, class_names, k=3)
            else:
                expected = _labels_by_hand(scores, class_names, threshold=0.45)
            assert (row["labels"].split(";") if row["labels"] else []) == expected
        if option == "--threshold":
            assert 0 < sum(len(r["labels"].split(";")) for r in rows if r["labels"]) < 12 * len(class_names)


def test_csv_and_jsonl_read_back_to_the_same_float32_scores(run, class_names, tmp_path, capsys):
    paths = embedded_val_images(run)[:5]
    bad = truncated_jpeg(paths[0], tmp_path / "broken.jpg")
    inputs = [*paths[:3], str(bad), *paths[3:]]
    code, csv_out, _ = _predict([str(run), *inputs, "--format", "csv", "--device", "cpu"], capsys)
    assert code == 1
    code, jsonl_out, _ = _predict([str(run), *inputs, "--format", "jsonl", "--device", "cpu"], capsys)
    assert code == 1
    header, csv_rows = _csv_rows(csv_out)
    json_rows = [json.loads(line) for line in jsonl_out.splitlines()]
    assert header == ["path", "labels", "error", *class_names]
    assert len(csv_rows) == len(json_rows) == len(inputs)
    assert [r["path"] for r in csv_rows] == [r["path"] for r in json_rows] == inputs
    g = reference_generator(run / "checkpoints" / "last.pt")
    for row, record, path in zip(csv_rows, json_rows, inputs):
        assert set(record) == {"path", "labels", "scores", "error"}
        if path == str(bad):
            continue
        assert row["error"] == "" and record["error"] is None
        assert list(record["scores"]) == class_names
        from_csv = _scores(row, class_names)
        from_json = np.array([record["scores"][c] for c in class_names], dtype=np.float32)
        np.testing.assert_array_equal(from_csv, from_json)  # both exact float32 decimals
        with torch.no_grad():
            direct = torch.sigmoid(g(preprocess_image(path, 32)[None]))[0].numpy()
        np.testing.assert_allclose(from_csv, direct, rtol=0, atol=1e-6)
        assert record["labels"] == (row["labels"].split(";") if row["labels"] else [])


def test_an_unreadable_image_gets_an_error_row_and_the_run_goes_on(run, class_names, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    good = embedded_val_images(run)[:3]
    for i, p in enumerate(good):
        shutil.copy(p, folder / f"{i}.jpg")
    truncated_jpeg(good[0], folder / "1_truncated.jpg")
    (folder / "2_text.png").write_text("not an image")
    code, out, err = _predict([str(run), str(folder), str(tmp_path / "missing.jpg")], capsys)
    assert code == 1  # documented: some images could not be read
    rows = _csv_rows(out)[1]
    assert [Path(r["path"]).name for r in rows] == ["0.jpg", "1.jpg", "1_truncated.jpg", "2.jpg", "2_text.png", "missing.jpg"]
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"1_truncated.jpg", "2_text.png", "missing.jpg"}
    assert "truncated" in errors["1_truncated.jpg"] and "not found" in errors["missing.jpg"]
    for row in rows:
        scored = [row[c] for c in class_names]
        assert (all(scored) and not row["error"]) or (not any(scored) and row["labels"] == "")
    assert "1_truncated.jpg" in err and "3 images scored, 3 unreadable" in err


def test_folders_are_walked_and_list_files_read(run, tmp_path, capsys, monkeypatch):
    good = embedded_val_images(run)[:4]
    (tmp_path / "a" / "nested").mkdir(parents=True)
    shutil.copy(good[0], tmp_path / "a" / "z.jpg")
    shutil.copy(good[1], tmp_path / "a" / "nested" / "y.JPG")
    (tmp_path / "a" / "notes.txt").write_text("skipped: not an image extension")
    (tmp_path / "lists").mkdir()
    shutil.copy(good[2], tmp_path / "lists" / "relative.jpg")
    list_file = tmp_path / "lists" / "images.txt"
    list_file.write_text(f"# a comment\n\nrelative.jpg\n  {good[3]}  \n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{good[0]}\n"))
    code, out, _ = _predict([str(run), str(tmp_path / "a"), "--list", str(list_file), "--list", "-"], capsys)
    assert code == 0
    paths = [r["path"] for r in _csv_rows(out)[1]]
    assert paths == [
        str(tmp_path / "a" / "nested" / "y.JPG"),  # sorted walk: "nested/y.JPG" < "z.jpg"
        str(tmp_path / "a" / "z.jpg"),
        str(tmp_path / "lists" / "relative.jpg"),  # relative to the list file's folder
        good[3],
        good[0],
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/nope", "x.jpg"], "model {tmp}/nope does not exist"),
        (["{tmp}", "x.jpg"], "is a folder without fastmlgan.json or checkpoints/last.pt"),
        (["{img}", "x.jpg"], "is not a fastmlgan checkpoint (not a file written by torch.save)"),
        (["{run}", "x.jpg", "--top-k", "0"], "--top-k must be in [1, 16]"),
        (["{run}", "x.jpg", "--top-k", "17"], "--top-k must be in [1, 16]"),
        (["{run}", "x.jpg", "--threshold", "1.5"], "--threshold must be in [0, 1]"),
        (["{run}", "x.jpg", "--threshold", "0.3", "--top-k", "2"], "not allowed with argument"),
        (["{run}", "x.jpg", "--format", "xml"], "argument --format: invalid choice"),
        (["{run}", "x.jpg", "--batch-size", "0"], "--batch-size must be positive"),
        (["{run}"], "no images given"),
        (["{run}", "{tmp}"], "no image files (.jpg .jpeg .png .bmp .gif .webp .tif .tiff) found in {tmp}"),
        (["{run}", "--list", "{tmp}/missing.txt"], "--list {tmp}/missing.txt: cannot read it"),
        (["{run}", "{img}", "--out", "{tmp}/no/such/folder.csv"], "--out {tmp}/no/such/folder.csv: cannot write it"),
    ],
)
def test_bad_model_or_options_give_one_line_errors(run, tmp_path, capsys, args, message):
    img = embedded_val_images(run)[0]
    fill = {"tmp": str(tmp_path), "run": str(run), "img": img}
    code, out, err = _predict([a.format(**fill) for a in args], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message.format(**fill) in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(run, capsys):
    code, _, err = _predict([str(run), "x.jpg", "--device", "cuda"], capsys)
    assert code == 2 and err.strip() == (
        "error: --device cuda: no CUDA GPU is visible to this process; use --device cpu (or auto)"
    )


def test_module_entry_point_keeps_stdout_machine_readable(run, class_names):
    paths = embedded_val_images(run)[:3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "fastmlgan", "predict", str(run), *paths, "--format", "jsonl", "--batch-size", "2", "--num-workers", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # nothing but rows
    assert [r["path"] for r in records] == paths and all(len(r["scores"]) == len(class_names) for r in records)
    assert "3 images scored, 0 unreadable" in proc.stderr
