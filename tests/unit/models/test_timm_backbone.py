"""--model.backbone timm:NAME (the ``timm`` extra): G's trunk is timm's pooled feature, f_ext its
frozen copy; local weight files load exactly; bad names and offline downloads are one line; and
channels_last, bf16, compile, export (safetensors, torch.export, ONNX), predict, evaluate and DDP
all work with it. Small timm models with random weights (no network), small images."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import import_extra
from trained_model import embedded_val_images, restored_logging

from fastmlgan.errors import ConfigError
from fastmlgan.models import build_feature_extractor, build_generator

timm = import_extra("timm", "timm")

REPO = Path(__file__).resolve().parents[3]
MODELS = ["resnet18", "convnext_atto"]
S = 32  # image side: both models reduce it to 1x1 (resnet18, stride 32) or 1x1 (convnext, stride 32)
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _reference(name: str, generator) -> torch.nn.Module:
    """timm's own model (its ImageNet classifier kept) holding G's trunk weights: the reference
    for the pooled feature, built with timm's API alone."""
    ref = timm.create_model(name, pretrained=False)
    trunk = {k.removeprefix("trunk.model."): v for k, v in generator.state_dict().items() if k.startswith("trunk.model.")}
    missing, unexpected = ref.load_state_dict(trunk, strict=False)
    assert not unexpected and all(k.startswith(("fc.", "head.fc.", "classifier.")) for k in missing), missing
    return ref.eval()


@pytest.mark.parametrize("name", [*MODELS, "mobilenetv3_small_050"])
def test_trunk_and_f_ext_are_timms_pooled_feature(name):
    torch.manual_seed(0)
    g = build_generator(f"timm:{name}", 7).eval()
    ref = _reference(name, g)
    x = torch.randn(3, 3, S, S)
    with torch.no_grad():
        pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
        feat = g.trunk(x)
        f_ext = build_feature_extractor(g, "test")
        assert torch.equal(f_ext(x), feat)
        logits = g(x)
    # The feature width is the one timm's pooled feature has (mobilenetv3: its 1024-wide pre-logits
    # layer, not the 288 channels of num_features).
    assert g.feature_dim == pooled.shape[1] == feat.shape[1] and g.head.in_features == g.feature_dim
    torch.testing.assert_close(feat, pooled, rtol=0, atol=0)
    torch.testing.assert_close(logits, g.head(pooled), rtol=0, atol=0)
    assert not any(p.requires_grad for p in f_ext.parameters())
    f_ext.train()
    assert not f_ext.training  # BatchNorm statistics stay fixed


def test_input_map_converts_imagenet_normalisation_to_the_models(tmp_path):
    # vit_tiny's weights expect (p - 0.5) / 0.5; the loaders give (p - ImageNet mean) / ImageNet std.
    g = build_generator("timm:vit_tiny_patch16_224", 3)
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    loader = (pixels - mean) / std
    torch.testing.assert_close(loader * g.trunk.input_scale + g.trunk.input_shift, (pixels - 0.5) / 0.5)
    # ImageNet-normalised weights: the identity, exactly.
    r = build_generator("timm:resnet18", 3)
    assert torch.equal(loader * r.trunk.input_scale + r.trunk.input_shift, loader)
    # The map is saved with G: a rebuilt G (from '' weights) reads it back from the state dict.
    assert {"trunk.input_scale", "trunk.input_shift"} <= set(g.state_dict())


@pytest.mark.parametrize("name, suffix", [("resnet18", ".safetensors"), ("convnext_atto", ".pth")])
def test_a_local_weights_file_round_trips(tmp_path, name, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    hub = timm.create_model(name, pretrained=False)  # what the hub's file holds: the 1000-way classifier too
    state = hub.state_dict()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training checkpoint holding it
    g = build_generator(f"timm:{name}", 5, pretrained=str(path)).eval()
    loaded = {k.removeprefix("trunk.model."): v for k, v in g.state_dict().items() if k.startswith("trunk.model.")}
    assert loaded.keys() == {k for k in state if not k.startswith(("fc.", "head.fc."))}
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k
    # f_ext is the pretrained model's pooled feature (§4.1).
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(build_feature_extractor(g, "pretrained")(x),
                                   hub.eval().forward_head(hub.forward_features(x), pre_logits=True), rtol=0, atol=0)


def test_a_wrong_or_missing_file_is_one_line(tmp_path):
    other = tmp_path / "convnext.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("convnext_atto").state_dict(), str(other))
    with pytest.raises(ConfigError, match=r"does not match timm's resnet18 \(\d+ missing keys"):
        build_generator("timm:resnet18", 5, pretrained=str(other))
    resnet34 = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), resnet34)
    with pytest.raises(ConfigError, match=r"does not match timm's resnet18"):
        build_generator("timm:resnet18", 5, pretrained=str(resnet34))
    with pytest.raises(ConfigError, match="file not found"):
        build_generator("timm:resnet18", 5, pretrained=str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read it as a state dict"):
        build_generator("timm:resnet18", 5, pretrained=str(junk))
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file|FIFO"):
        build_generator("timm:resnet18", 5, pretrained=str(fifo))


def test_bad_names_and_tags_list_what_timm_has():
    with pytest.raises(ConfigError, match=r"timm has no model 'resnt18'; close names: .*\bresnet18\b"):
        build_generator("timm:resnt18", 5)
    with pytest.raises(ConfigError, match=r"close names: .*\bconvnext_atto\b"):
        build_generator("timm:convnext_ato", 5)
    with pytest.raises(ConfigError, match=r"resnet18 has no weights 'bogus'; valid tags: .*a1_in1k"):
        build_generator("timm:resnet18.bogus", 5)
    with pytest.raises(ConfigError, match=r"--model.pretrained 'xx': .*valid: DEFAULT, .*tv_in1k"):
        build_generator("timm:resnet18", 5, pretrained="xx")


def test_an_image_size_the_model_cannot_take_is_one_line():
    with pytest.raises(ConfigError, match=r"--data.image_size 64: timm:vit_tiny_patch16_224 takes 224x224 images only"):
        build_generator("timm:vit_tiny_patch16_224", 5, image_size=64)
    with pytest.raises(ConfigError, match=r"--data.image_size 8: timm:convnext_atto cannot take 8x8 images \("):
        build_generator("timm:convnext_atto", 5, image_size=8)
    # The check is a forward in eval mode: G comes back in training mode, its BatchNorm statistics untouched.
    torch.manual_seed(0)
    g = build_generator("timm:resnet18", 5, image_size=S)
    torch.manual_seed(0)
    unchecked = build_generator("timm:resnet18", 5)
    assert all(m.training for m in g.modules()) and all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), unchecked.state_dict().values()))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
def test_phase2_chunked_batch_norm_equals_separate_forwards(name, caplog):
    """Phase 2's one no-grad forward over d updates' images (models/chunked_norm.py) equals d
    separate forwards: resnet18's nn.BatchNorm2d and mobilenetv3's timm BatchNormAct2d (BatchNorm
    then activation in one module), outputs and running statistics both."""
    import copy

    from fastmlgan.models.chunked_norm import batch_norm_chunks, make_chunkable

    torch.manual_seed(5)
    g = make_chunkable(build_generator(f"timm:{name}", 4)).train()
    assert "not chunked" not in caplog.text
    g2 = copy.deepcopy(g)
    x = torch.randn(12, 3, S, S) * 2 + 0.5
    with torch.no_grad():
        separate = torch.cat([g(chunk) for chunk in x.chunk(3)])
        with batch_norm_chunks(g2, 3):
            chunked = g2(x)
        together = copy.deepcopy(g)(x)  # one BatchNorm batch of 12: what chunking avoids
    torch.testing.assert_close(chunked, separate, rtol=1e-4, atol=1e-4)
    assert (together - separate).abs().max() > 1e-3
    for (key, a), b in zip(g.state_dict().items(), g2.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=key)


def _cli(args: list[str], tmp_path: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastmlgan", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_offline_download_and_bad_name_are_one_line_from_the_cli(tmp_path):
    # HF_HUB_OFFLINE and an empty cache: the same failure as no network, without its retries.
    train = ["train", "--preset", "smoke", "--out", str(tmp_path / "run"), "--data.root", str(tmp_path / "data")]
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = _cli([*train, "--model.backbone", "timm:resnet18", "--model.pretrained", "DEFAULT"], tmp_path, offline)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "could not download timm's resnet18 weights from https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors" in lines[-1]
    assert lines[-1].endswith("--model.pretrained /path/to/model.safetensors")
    proc = _cli([*train, "--model.backbone", "timm:resnt18", "--overwrite", "true"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "timm has no model 'resnt18'; close names: resnet18" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_and_bf16_autocast(name):
    torch.manual_seed(2)
    g = build_generator(f"timm:{name}", 6).eval()
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        fp32 = g(x)
        g_cl = g.to(memory_format=torch.channels_last)
        last = g_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = g_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(last, fp32, rtol=1e-4, atol=1e-5)
    assert bf16.dtype == torch.bfloat16  # the head ran under autocast
    # bf16 keeps 8 bits of mantissa: logits of size ~1 within a few percent, not equal.
    err = (bf16.float() - fp32).abs().max().item()
    assert 0 < err < 0.1 * max(1.0, fp32.abs().max().item()), err


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_compiled_bce_step_matches_eager(name):
    """Phase 1's step as the trainer compiles it (one fullgraph region: G's forward, the loss and,
    through backward, G's gradients) against eager."""
    from fastmlgan.losses import bce_loss

    torch.manual_seed(3)
    g = build_generator(f"timm:{name}", 6)
    batch = {"x": torch.randn(4, 3, S, S), "y": torch.randint(0, 2, (4, 6)).float()}
    results = []
    for fn in (bce_loss, torch.compile(bce_loss, fullgraph=True)):
        g.zero_grad(set_to_none=True)
        out = fn(g, batch)
        out["loss_g"].backward()
        results.append((out["loss_g"].detach(), [p.grad.clone() for p in g.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # Inductor's fused kernels sum in another order: measured differences up to 2e-5 on
    # gradients whose largest entry is ~0.1, so each tensor is compared relative to its scale.
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()) + 1e-7)
    assert max(b.abs().max().item() for b in eager_grads) > 0


# --------------------------------------------------------------------------------------------
# A trained timm G through the commands: train (both phases), export, predict, evaluate.


@pytest.fixture(scope="module", params=MODELS)
def timm_run(request, tmp_path_factory) -> tuple[str, Path, Path | None]:
    """(model name, run directory, pretrained file or None): the smoke preset with a timm G, two
    steps of each phase. resnet18 starts from a local weights file (random weights saved as the
    hub's model.safetensors), so f_ext is that file's model; convnext_atto from random weights."""
    from safetensors.torch import save_file

    from fastmlgan.commands.train import main

    name = request.param
    root = tmp_path_factory.mktemp(f"timm-{name}")
    pretrained = None
    args = ["--preset", "smoke", "--out", str(root / "run"), "--data.root", str(root / "data"),
            "--model.backbone", f"timm:{name}", "--train.bce_epochs", "1", "--train.gan_epochs", "1",
            "--train.max_steps_per_epoch", "2", "--data.embedded_num_val", "32", "--data.image_size", str(S)]
    if name == "resnet18":
        torch.manual_seed(4)
        pretrained = root / "model.safetensors"
        save_file(timm.create_model(name).state_dict(), str(pretrained))
        args += ["--model.pretrained", str(pretrained)]
    with restored_logging():
        assert main(args) == 0
    return name, root / "run", pretrained


def _hand_built_logits(name: str, state: dict, x: torch.Tensor) -> torch.Tensor:
    """G's logits from the checkpoint's tensors with timm's API and torch alone."""
    weights = state["generator"]
    model = timm.create_model(name, num_classes=0)
    model.load_state_dict({k.removeprefix("trunk.model."): v for k, v in weights.items() if k.startswith("trunk.model.")})
    with torch.no_grad():
        pooled = model.eval()(x * weights["trunk.input_scale"] + weights["trunk.input_shift"])
        return torch.nn.functional.linear(pooled, weights["head.weight"], weights["head.bias"])


@pytest.mark.slow
def test_a_timm_g_trains_exports_and_predicts_as_in_process(timm_run, tmp_path, capsys):
    from fastmlgan.classifier import load_classifier, preprocess_image
    from fastmlgan.commands import export, predict
    from fastmlgan.commands.evaluate import checkpoint_scores

    name, run, pretrained = timm_run
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["phase"] == "done" and state["config"]["model"]["backbone"] == f"timm:{name}"
    if pretrained is not None:  # §4.1: f_ext is the pretrained model, frozen; G moved away from it
        from safetensors.torch import load_file

        hub = load_file(str(pretrained))
        f_ext = state["feature_extractor"]
        assert state["feature_extractor_source"] == f"pretrained:{pretrained}"
        trunk = [k for k in f_ext if k.startswith("trunk.model.")]
        assert trunk and all(torch.equal(f_ext[k], hub[k.removeprefix("trunk.model.")]) for k in trunk)
        assert not torch.equal(state["generator"]["trunk.model.conv1.weight"], hub["conv1.weight"])

    out = tmp_path / "export"
    flags = ["--torch-export"] + (["--onnx"] if HAVE_ONNX else [])
    with restored_logging():
        assert export.main(["--checkpoint", str(run), "--out", str(out), *flags]) == 0
    sidecar = json.loads((out / "fastmlgan.json").read_text())
    assert sidecar["model"]["backbone"] == f"timm:{name}" and sidecar["versions"]["timm"] == timm.__version__

    paths = embedded_val_images(run)
    x = torch.stack([preprocess_image(p, S) for p in paths])
    expected = _hand_built_logits(name, state, x)
    g, names = load_classifier(out)
    with torch.no_grad():
        torch.testing.assert_close(g(x), expected, rtol=0, atol=1e-6)
        program = torch.export.load(str(out / "model.pt2")).module()
        torch.testing.assert_close(program(x), expected, rtol=0, atol=1e-5)
    if HAVE_ONNX:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)

    capsys.readouterr()
    with restored_logging():
        assert predict.main([str(out), *paths, "--format", "jsonl", "--num-workers", "0", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    scores = np.array([[r["scores"][c] for c in names] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(scores, torch.sigmoid(expected).numpy(), rtol=0, atol=1e-6)
    evaluated, _ = checkpoint_scores(str(run), {"data.backend": "torch", "precision.amp": "none"})
    np.testing.assert_allclose(evaluated, scores, rtol=0, atol=1e-6)
    assert scores.std() > 1e-4  # scores that differ between images and classes


@pytest.mark.slow
def test_ddp_two_ranks_keep_a_timm_g_in_step(tmp_path):
    """torchrun, two gloo ranks, eager DDP: three BCE steps, f_ext frozen, two phase-2 iterations
    (tests/helpers/ddp_worker.py). The ranks read different images, yet every parameter, and f_ext with
    its BatchNorm statistics, is bit-identical across them."""
    worker = [str(REPO / "tests" / "helpers" / "ddp_worker.py"), str(tmp_path / "run"), str(tmp_path / "data"), "eager",
              "model.backbone=timm:resnet18", f"data.image_size={S}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "ddp_result.json").read_text())
    assert result["backbone"] == "timm:resnet18"
    a, b = result["first_batch_indices"]
    assert not set(a) & set(b)
    assert result["change_from_init"] > 1e-4
    assert result["max_abs_diff"] == 0.0 and result["f_ext_max_abs_diff"] == 0.0
