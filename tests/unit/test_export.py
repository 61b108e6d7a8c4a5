"""``fastmlgan export`` and ``fastmlgan.load_classifier``: each exported file gives the checkpoint's
G outputs on real images; the sidecar describes G; bad input gives one-line errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
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

import fastmlgan
from fastmlgan.classifier import preprocess_image
from fastmlgan.commands import export, predict
from fastmlgan.errors import ConfigError

# One smoke-preset training per session (~15 s on 2 busy cores) feeds every test here.
pytestmark = pytest.mark.slow
# Logits of the exported programs against eager G on the same batch, fp32 on the CPU. Measured on
# the smoke model: torch.export 0, ONNX Runtime <= 2e-7 (its own conv kernels). A wrong weight,
# a missing BatchNorm statistic or train-mode BatchNorm moves logits by > 1e-2.
TORCH_EXPORT_ATOL = 1e-6
ONNX_ATOL = 1e-5
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    flags = ["--torch-export"] + (["--onnx"] if HAVE_ONNX else [])
    with restored_logging():
        assert export.main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--out", str(out), *flags]) == 0
    return out


@pytest.fixture(scope="module", params=["embedded", pytest.param("coco128", marks=pytest.mark.realdata)])
def images(request, run) -> torch.Tensor:
    """A batch of G's inputs: the run's own evaluation images, or real coco128 JPEGs."""
    if request.param == "embedded":
        paths = embedded_val_images(run)[:16]
    else:
        paths = coco128_images(request.getfixturevalue("shared_data"), 15)
    return torch.stack([preprocess_image(p, 32) for p in paths])


def _logits(module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def test_sidecar_describes_g_and_its_source(run, exported):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    sidecar = json.loads((exported / "fastmlgan.json").read_text())
    assert sidecar["format"] == "fastmlgan-classifier" and sidecar["format_version"] == 2
    assert sidecar["class_names"] == state["class_names"]
    model = state["config"]["model"]
    assert {k: sidecar["model"][k] for k in ("backbone", "num_labels", "width", "feature_dim", "in_dim")} == {
        "backbone": "smallcnn", "num_labels": 16, "width": model["width"], "feature_dim": 8 * model["width"], "in_dim": None,
    }
    pre = sidecar["preprocessing"]
    assert pre["image_size"] == state["config"]["data"]["image_size"] == 32
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225] and pre["channels"] == "RGB"
    assert sidecar["training_config"] == state["config"]
    source = sidecar["source"]
    assert source["checkpoint"] == str((run / "checkpoints" / "last.pt").resolve())
    assert (source["phase"], source["global_step"]) == (state["phase"], state["global_step"]) == ("done", state["global_step"])
    assert source["gan_metrics"] == state["gan_metrics"]
    assert sidecar["versions"]["torch"] == torch.__version__ and sidecar["versions"]["fastmlgan"] == fastmlgan.__version__


def test_weights_are_g_only_and_exact(run, exported):
    from safetensors.torch import load_file

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["generator"]
    weights = load_file(exported / "model.safetensors")
    assert set(weights) == set(state)  # G only: no discriminator, f_ext or optimizer tensors
    assert all(k.startswith(("trunk.", "head.")) for k in weights)
    for k, v in state.items():
        assert torch.equal(weights[k], v), k


def test_load_classifier_gives_the_checkpoints_g(run, exported, images):
    reference = reference_generator(run / "checkpoints" / "last.pt")
    expected = _logits(reference, images)
    for source in (exported, run, run / "checkpoints" / "last.pt"):
        g, names = fastmlgan.load_classifier(source)
        assert isinstance(g, torch.nn.Module) and not g.training
        assert names == torch.load(run / "checkpoints" / "last.pt", weights_only=True)["class_names"]
        assert torch.equal(_logits(g, images), expected), source  # the same module, weights and ops
    # eval mode matters: BatchNorm with batch statistics gives other logits
    assert not torch.allclose(_logits(reference.train(), images), expected, atol=1e-2)


def test_torch_export_matches_g(run, exported, images):
    program = torch.export.load(str(exported / "model.pt2")).module()
    expected = _logits(reference_generator(run / "checkpoints" / "last.pt"), images)
    for batch in (images, images[:1]):  # the traced batch size was 2: the batch is dynamic
        got = _logits(program, batch)
        torch.testing.assert_close(got, expected[: len(batch)], rtol=0, atol=TORCH_EXPORT_ATOL)


@pytest.mark.skipif(not HAVE_ONNX, reason="onnx, onnxscript and onnxruntime are optional: pip install onnx onnxscript onnxruntime")
def test_onnx_matches_g(run, exported, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = _logits(reference_generator(run / "checkpoints" / "last.pt"), images).numpy()
    for batch in (images, images[:1]):
        got = session.run(["logits"], {"images": batch.numpy()})[0]
        np.testing.assert_allclose(got, expected[: len(batch)], rtol=0, atol=ONNX_ATOL)
    sidecar = json.loads((exported / "fastmlgan.json").read_text())
    assert sidecar["files"]["onnx"]["max_abs_diff"] <= ONNX_ATOL


def test_predict_reads_the_export_like_the_checkpoint(run, exported, tmp_path, capsys):
    paths = embedded_val_images(run)[:6]
    outputs = []
    for model in (run, exported):
        with restored_logging():
            assert predict.main([str(model), *paths, "--format", "jsonl", "--num-workers", "0", "--device", "cpu"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 6


def _export_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # only this call's output (a fixture's training run may have logged before it)
    with restored_logging():
        code = export.main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_refuses_a_non_empty_folder_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.onnx").write_text("the user's own model")
    (out / "notes.txt").write_text("the user's own file")
    ckpt = str(run / "checkpoints" / "baseline.pt")
    # Issue 18: --overwrite replaces an earlier export only; a folder without one is left alone.
    for extra in ([], ["--overwrite"]):
        assert f"--out {out} is not empty and holds no fastmlgan export" in _export_error(
            ["--checkpoint", ckpt, "--out", str(out), *extra], capsys
        )
    assert (out / "model.onnx").read_text() == "the user's own model"
    (out / "model.onnx").unlink()
    with restored_logging():
        assert export.main(["--checkpoint", str(run), "--out", str(out / "first")]) == 0
    shutil.copytree(out / "first", out, dirs_exist_ok=True)  # an earlier export (no ONNX file in it) beside notes.txt
    shutil.rmtree(out / "first")
    sidecar = json.loads((out / "fastmlgan.json").read_text())
    sidecar["files"]["onnx"] = {"file": "model.onnx"}  # as if it had been written with --onnx
    (out / "fastmlgan.json").write_text(json.dumps(sidecar))
    (out / "model.onnx").write_text("left by the earlier export")
    assert "holds an earlier export; pick another folder or pass --overwrite" in _export_error(
        ["--checkpoint", ckpt, "--out", str(out)], capsys
    )
    with restored_logging():
        assert export.main(["--checkpoint", ckpt, "--out", str(out), "--overwrite"]) == 0
    sidecar = json.loads((out / "fastmlgan.json").read_text())
    assert sidecar["files"]["onnx"] is None and not (out / "model.onnx").exists()  # the earlier export's stale file is gone
    assert (out / "notes.txt").exists()
    assert sidecar["source"]["checkpoint"].endswith("baseline.pt")
    # baseline.pt is the end of phase 1: another G than last.pt's
    g_baseline, _ = fastmlgan.load_classifier(out)
    g_last, _ = fastmlgan.load_classifier(run)
    x = torch.stack([preprocess_image(p, 32) for p in embedded_val_images(run)[:4]])
    assert not torch.allclose(_logits(g_baseline, x), _logits(g_last, x), atol=1e-3)


def test_bad_input_gives_one_line_errors(run, exported, tmp_path, capsys):
    assert "checkpoint" in _export_error(["--out", str(tmp_path / "x")], capsys)
    missing = tmp_path / "missing.pt"
    assert f"model {missing} does not exist" in _export_error(["--checkpoint", str(missing), "--out", str(tmp_path / "x")], capsys)
    assert "is already an exported model folder" in _export_error(["--checkpoint", str(exported), "--out", str(tmp_path / "x")], capsys)
    image = truncated_jpeg(embedded_val_images(run)[0], tmp_path / "x.jpg")
    assert "is not a fastmlgan checkpoint" in _export_error(["--checkpoint", str(image), "--out", str(tmp_path / "y")], capsys)
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "is a file; give a folder" in _export_error(["--checkpoint", str(run), "--out", str(a_file)], capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # A bad sidecar or weights file names itself.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "fastmlgan.json").write_text(json.dumps({"format": "fastmlgan-classifier", "format_version": 99}))
    with pytest.raises(ConfigError, match="format_version 99"):
        fastmlgan.load_classifier(broken)
    sidecar = json.loads((exported / "fastmlgan.json").read_text())
    (broken / "fastmlgan.json").write_text(json.dumps(sidecar))
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="model.safetensors: its SHA-256 differs from files.weights_sha256"):
        fastmlgan.load_classifier(broken)
    sidecar["format_version"] = 1  # an export from before the checksum: read, and its damage named
    del sidecar["files"]["weights_sha256"]
    (broken / "fastmlgan.json").write_text(json.dumps(sidecar))
    with pytest.raises(ConfigError, match="model.safetensors: cannot read the weights"):
        fastmlgan.load_classifier(broken)


def test_missing_onnx_packages_are_named_and_nothing_is_left(run, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    out = tmp_path / "model"
    message = _export_error(["--checkpoint", str(run), "--out", str(out), "--onnx"], capsys)
    assert message == (
        "error: --onnx needs the onnxscript package(s): pip install onnx onnxscript (onnxruntime to run the model)"
    )
    assert not out.exists()  # the folder it created for the export is removed again


@pytest.mark.realdata
def test_feature_model_export_keeps_the_standardization(shared_data, tmp_path, capsys):
    """An mlp G (MULAN scene): in_dim comes from the weights, mean/std of the training split are
    stored (checkpoints lack them), and predict refuses it with a one-line error."""
    from fastmlgan.config import build_config
    from fastmlgan.data.backends.vectors import Standardizer
    from fastmlgan.data.sources.features import load_feature_dataset
    from fastmlgan.models import build_generator

    scene = shared_data / "mulan" / "scene"
    files = {"train": scene / "scene-train.arff", "test": scene / "scene-test.arff", "xml": scene / "scene.xml"}
    cfg = build_config({
        "data.dataset": "features", "data.features_train": str(files["train"]), "data.features_test": str(files["test"]),
        "data.features_xml": str(files["xml"]), "model.backbone": "mlp", "model.width": 16, "model.depth": 2,
    })
    train, _ = load_feature_dataset(files["train"], files["test"], xml=files["xml"])
    torch.manual_seed(0)
    g = build_generator("mlp", len(train.class_names), "", width=16, depth=2, in_dim=train.features.shape[1]).eval()
    state = {"config": cfg.to_dict(), "class_names": list(train.class_names), "generator": g.state_dict(),
             "phase": "done", "epoch": 1, "global_step": 7}
    torch.save(state, tmp_path / "mlp.pt")
    with restored_logging():
        assert export.main(["--checkpoint", str(tmp_path / "mlp.pt"), "--out", str(tmp_path / "model")]) == 0
    capsys.readouterr()
    sidecar = json.loads((tmp_path / "model" / "fastmlgan.json").read_text())
    assert sidecar["model"]["in_dim"] == train.features.shape[1] == 294
    reference = Standardizer().fit(train.features)
    np.testing.assert_array_equal(np.float32(sidecar["preprocessing"]["standardize"]["mean"]), reference.mean)
    np.testing.assert_array_equal(np.float32(sidecar["preprocessing"]["standardize"]["std"]), reference.std)
    loaded, names = fastmlgan.load_classifier(tmp_path / "model")
    x = torch.from_numpy(reference.transform(train.features[:8]))
    assert names == list(train.class_names) and torch.equal(_logits(loaded, x), _logits(g, x))
    with restored_logging():
        assert predict.main([str(tmp_path / "model"), str(tmp_path / "mlp.pt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'model'}: G takes feature vectors (backbone mlp), not images"
    )
