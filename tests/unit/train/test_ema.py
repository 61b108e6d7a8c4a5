"""The weight EMA of G (``--train.ema_decay``, ``fastmlgan/train/ema.py``): the update against a
hand computation, the warm-up against timm's ``ModelEmaV3.get_decay``, D and the G step seeing
G's raw weights, compile, the evaluation and export of the averaged weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastmlgan.config import build_config
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError
from fastmlgan.train.ema import WeightEma, ema_decay_at

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _timm_get_decay(step, decay, use_warmup=True, warmup_power=2 / 3, warmup_gamma=1.0, update_after_step=0, min_decay=0.0):
    """timm's ``ModelEmaV3.get_decay`` (huggingface/pytorch-image-models, timm/utils/model_ema.py),
    transcribed; timm's train.py calls ``update(model, step=num_updates)`` with the count of
    optimiser updates including this one."""
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        d = 1 - (1 + step / warmup_gamma) ** -warmup_power
        return max(min(d, decay), min_decay)
    return decay


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.9999])
@pytest.mark.parametrize("power", [2 / 3, 0.75, 1.0])
@pytest.mark.parametrize("warmup", [True, False])
def test_warmup_schedule_is_timms(decay, power, warmup):
    for step in [*range(1, 300), 1000, 10_000, 31_623, 10**6]:
        assert ema_decay_at(step - 1, decay, warmup, power) == pytest.approx(
            _timm_get_decay(step, decay, warmup, power), rel=1e-12, abs=0
        ), step


def test_warmup_values_by_hand():
    # The first update copies; then 1 - (1 + n)^(-2/3): 1 - 2^(-2/3), 1 - 3^(-2/3); capped at the decay.
    assert ema_decay_at(0, 0.999) == 0.0
    assert ema_decay_at(1, 0.999) == pytest.approx(0.3700394750525, rel=1e-12)
    assert ema_decay_at(2, 0.999) == pytest.approx(0.5192501432308, rel=1e-12)
    # timm's docstring: power 2/3 reaches 0.999 at 31.6K steps; power 3/4 at 10K.
    assert ema_decay_at(31_622, 0.9999) == pytest.approx(0.999, abs=2e-8)
    assert ema_decay_at(9_999, 0.9999, power=0.75) == pytest.approx(0.999, abs=1e-9)
    assert ema_decay_at(10**7, 0.999) == 0.999
    assert ema_decay_at(5, 0.9, warmup=False) == 0.9


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_update_against_a_hand_computation():
    """Three updates of a Linear + BatchNorm net whose weights change between them: each float entry
    (weights and running statistics) follows e ← d e + (1 − d) w with timm's d_n, in float64 by
    hand; the integer batch counter is copied."""
    torch.manual_seed(0)
    net = _Net().double()
    ema = WeightEma(net, decay=0.95, warmup=True, power=2 / 3)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    decays = [0.0, 1 - 2 ** (-2 / 3), min(0.95, 1 - 3 ** (-2 / 3)), min(0.95, 1 - 4 ** (-2 / 3))]
    for n, d in enumerate(decays):
        with torch.no_grad():  # new weights and statistics, as an optimiser step and a forward would leave them
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.train()(torch.randn(5, 3, dtype=torch.float64))
        ema.update(net)
        for key, w in net.state_dict().items():
            if w.is_floating_point():
                expected[key] = d * expected[key] + (1 - d) * w
            else:
                expected[key] = w.clone()
        assert ema.updates == n + 1
        for key, value in ema.module.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-12, atol=1e-12, msg=f"update {n + 1}: {key}")
    assert ema.module.state_dict()["bn.num_batches_tracked"].item() == 4
    # The average is not the net: four updates with decays up to 0.6 leave it well behind.
    assert (ema.module.fc.weight - net.fc.weight).abs().max() > 0.1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_a_wrong_decay_is_caught_by_the_hand_computation():
    """The hand computation tells the decay from 1 − decay and from the un-warmed decay."""
    torch.manual_seed(1)
    net = _Net().double()
    ema = WeightEma(net, decay=0.95)
    ema.update(net)  # a copy
    with torch.no_grad():
        net.fc.weight.add_(1.0)
    before = ema.module.fc.weight.clone()
    ema.update(net)
    d = 1 - 2 ** (-2 / 3)
    got = ema.module.fc.weight
    torch.testing.assert_close(got, d * before + (1 - d) * net.fc.weight, rtol=1e-12, atol=1e-12)
    for wrong in (1 - d, 0.95):
        assert (got - (wrong * before + (1 - wrong) * net.fc.weight)).abs().max() > 1e-2


def test_options_and_their_errors():
    assert WeightEma.create(build_config(preset="smoke").train, _Net()) is None  # off by default
    cfg = build_config({"train.ema_decay": "0.99", "train.ema_warmup": "false"}, preset="smoke")
    ema = WeightEma.create(cfg.train, _Net())
    assert (ema.decay, ema.warmup) == (0.99, False)
    for key, value, message in (
        ("train.ema_decay", "1", "--train.ema_decay must be a finite number in [0, 1)"),
        ("train.ema_decay", "-0.1", "--train.ema_decay must be a finite number in [0, 1)"),
        ("train.ema_warmup_power", "0", "--train.ema_warmup_power must be a finite number in (0, 10]"),
    ):
        with pytest.raises(ConfigError) as info:
            build_config({key: value}, preset="smoke")
        assert str(info.value).startswith(message)


# ----------------------------------------------------------------------------------------------
# In the Trainer


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("ema") / "embedded"
    embedded.ensure(root, num_train=256, num_val=64, image_size=40, seed=0)
    return root


def _trainer(root, tmp_path, **overrides):
    from fastmlgan.train.trainer import Trainer

    cfg = build_config({"data.root": str(root), "data.embedded_num_val": "64", "out": str(tmp_path), **overrides}, preset="smoke")
    return Trainer(cfg, CPU, tmp_path)


def _params(module: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in module.state_dict().values()])


def test_d_and_the_g_step_see_the_raw_weights(smoke_root, tmp_path):
    """Poisoning the average (NaN weights) changes nothing in training: f_ext, D's inputs and the G
    step use G's raw weights. Both trainers end bit for bit alike; the average tracks G."""
    from fastmlgan.data.stream import BatchStream

    results = []
    for ema in ("0", "0.9"):
        trainer = _trainer(smoke_root, tmp_path / ema, **{"train.ema_decay": ema})
        stream = BatchStream(trainer.train_loader)
        for _ in range(3):
            trainer.steps.bce_step(stream.next())
        if trainer.steps.ema is not None:
            with torch.no_grad():
                for t in trainer.steps.ema.module.state_dict().values():
                    if t.is_floating_point():
                        t.fill_(float("nan"))
        trainer.start_gan_phase()
        gan = BatchStream(trainer.build_gan_loader(), data_epoch=1)
        for _ in range(2):
            trainer.steps.train_step(gan.next())
        results.append((_params(trainer.steps.generator), _params(trainer.steps.discriminator), trainer.steps.ema))
    (g0, d0, _), (g1, d1, ema) = results
    assert torch.equal(g0, g1) and torch.equal(d0, d1)
    assert ema.updates == 5 and torch.isnan(_params(ema.module)).any()  # the NaN stayed in the average only


def test_compiled_steps_update_the_average(smoke_root, tmp_path):
    """--compile.enable: the average follows the compiled G steps (the update itself stays eager,
    outside the compiled regions): after each step it is the hand formula applied to the weights
    the compiled step left."""
    from fastmlgan.data.stream import BatchStream

    trainer = _trainer(smoke_root, tmp_path, **{"train.ema_decay": "0.5", "compile.enable": "true"})
    stream = BatchStream(trainer.train_loader)
    expected = None
    for n in range(3):
        trainer.steps.bce_step(stream.next())
        d = min(0.5, 1 - (1 + n) ** (-2 / 3)) if n else 0.0
        state = trainer.steps.generator.state_dict()
        w = {k: v.detach().double() for k, v in state.items()}
        expected = w if expected is None else {
            k: (d * expected[k] + (1 - d) * w[k]) if state[k].is_floating_point() else w[k] for k in w
        }
        for key, value in trainer.steps.ema.module.state_dict().items():
            torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-7, msg=f"step {n + 1}: {key}")
    assert trainer.steps.ema.updates == 3
    assert (_params(trainer.steps.ema.module) - _params(trainer.steps.generator)).abs().max() > 1e-4


def test_the_average_is_evaluated_chosen_and_exported(tmp_path, capsys):
    """A run with EMA and a validation split: metrics.json holds the averaged weights' test metrics
    (equal to an independent evaluation of the checkpoint's average), the choice between raw and
    EMA made on validation, and export writes the chosen weights (or those asked for)."""
    from safetensors.torch import load_file

    from fastmlgan.commands.evaluate import checkpoint_scores
    from fastmlgan.commands.export import main as export_main
    from fastmlgan.commands.train import main as train_main
    from fastmlgan.metrics import compute_metrics
    from fastmlgan.train import checkpoint as ckpt

    run = tmp_path / "run"
    code = train_main(["--preset", "smoke", "--out", str(run), "--data.root", str(tmp_path / "data"),
                       "--train.max_steps_per_epoch", "4", "--data.embedded_num_val", "64",
                       "--train.ema_decay", "0.5", "--data.val_fraction", "0.25", "--log.plots", "false"])
    assert code == 0
    results = json.loads((run / "metrics.json").read_text())
    record = results["selection"]["gan"]
    state = ckpt.load(run / "checkpoints" / "last.pt")
    assert state["ema"]["updates"] == state["global_step"]
    scores, targets = checkpoint_scores(str(run), {}, weights="ema")
    ema_test = record["weights"]["ema"]["test"]["0.5"]
    assert ema_test == compute_metrics(scores, targets)
    assert ema_test != record["weights"]["raw"]["test"]["0.5"]
    assert record["weights"]["raw"]["test"]["0.5"] == results["gan"]
    raw_val, ema_val = (record["weights"][w]["validation_C-F1"]["global"] for w in ("raw", "ema"))
    assert record["chosen"] == ("ema" if ema_val > raw_val else "raw")
    for weights, expected in (("raw", "generator"), ("ema", "ema"), ("auto", "ema" if record["chosen"] == "ema" else "generator")):
        out = tmp_path / f"export-{weights}"
        assert export_main(["--checkpoint", str(run), "--out", str(out), "--weights", weights]) == 0
        sidecar = json.loads((out / "fastmlgan.json").read_text())
        reference = state["ema"]["weights"] if expected == "ema" else state["generator"]
        exported = load_file(out / "model.safetensors")
        assert all(torch.equal(exported[k], reference[k]) for k in exported)
        assert sidecar["weights"] == ("ema" if expected == "ema" else "raw")
        assert sidecar["thresholds"]["global"] == record["weights"][sidecar["weights"]]["thresholds"]["global"]
    capsys.readouterr()


def test_weights_ema_of_a_run_without_an_average_is_one_line(tmp_path_factory, tmp_path, capsys):
    from trained_model import smoke_run

    from fastmlgan.commands.export import main as export_main

    run = smoke_run(tmp_path_factory)
    capsys.readouterr()
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "x"), "--weights", "ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --weights ema:") and "--train.ema_decay" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_warmup_reaches_the_configured_decay_at_the_documented_step():
    # README/docs: with the default power 2/3 a decay of 0.999 is reached at about 31.6k updates.
    n = math.ceil(1000 ** 1.5) - 1
    assert ema_decay_at(n, 0.999) == pytest.approx(0.999, abs=1e-9) and ema_decay_at(n - 100, 0.999) < 0.999


# ----------------------------------------------------------------------------------------------
# DDP and resume (subprocesses)

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_the_average_is_one_model_on_every_rank(tmp_path, mode):
    """torchrun, 2 ranks (gloo): the averaged parameters agree bit for bit without any exchange
    (the same averaged gradients and Adam steps on every rank); the BatchNorm statistics, which each
    rank's forwards update from its own batch, agree after ``sync`` (rank 0's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = [str(REPO / "tests" / "helpers" / "ddp_ema_worker.py"), str(tmp_path / "run"), str(tmp_path / "data"), mode]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "ddp_ema_result.json").read_text())
    assert result["updates"] == 5
    assert result["params_max_abs_diff"] == 0.0
    assert result["buffers_differed_before_sync"] > 0  # what sync is for
    assert result["buffers_max_abs_diff"] == 0.0
    assert result["ema_from_g"] > 1e-4  # an average, not a copy of G


# The faults tests' run (tests/integration/test_faults.py: 2 BCE epochs of 20 steps, 3 GAN epochs of 2
# iterations, a checkpoint after every step) with the average and a validation split on.
EMA_RUN = ["--train.ema_decay", "0.9", "--data.val_fraction", "0.25"]


@pytest.mark.slow
def test_killed_and_resumed_run_with_the_average_equals_uninterrupted(tmp_path):
    """SIGTERM in phase 1 and SIGKILL in phase 2, each resumed: the same metrics.json (the averaged
    weights' metrics, the thresholds and the choice included), byte for byte, and the same G, D
    and average, bit for bit."""
    from fault_runs import _kill_at, _run, _train

    from fastmlgan.train import checkpoint as ckpt

    def result(run: Path):
        state = ckpt.load(run / ckpt.CHECKPOINT_DIR / ckpt.LAST)
        weights = {f"g.{k}": v for k, v in state["generator"].items()}
        weights.update({f"d.{k}": v for k, v in state["discriminator"].items()})
        weights.update({f"ema.{k}": v for k, v in state["ema"]["weights"].items()})
        return (run / "metrics.json").read_bytes(), weights, state["ema"]["updates"]

    data, reference = tmp_path / "data", tmp_path / "reference"
    proc = _run(_train(reference, data, *EMA_RUN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics, weights, updates = result(reference)
    assert updates == 46 and b'"selection"' in metrics
    for step, sig in ((7, signal.SIGTERM), (41, signal.SIGKILL)):
        run = tmp_path / f"killed-{step}"
        code = _kill_at(_train(run, data, *EMA_RUN), run, step, sig)
        assert code in (0, 128 + signal.SIGTERM, -signal.SIGKILL), code
        if code != 0:
            proc = _run(_train(run, data, *EMA_RUN, "--resume", str(run)))
            assert proc.returncode == 0, proc.stderr[-3000:]
        got_metrics, got_weights, got_updates = result(run)
        assert got_metrics == metrics, f"metrics.json differs after a kill at step {step}"
        assert got_updates == updates and got_weights.keys() == weights.keys()
        for name, value in weights.items():
            assert torch.equal(got_weights[name], value), f"{name} differs after a kill at step {step}"
