"""Faults: a run killed at any step (SIGTERM: a scheduler's pre-emption; SIGINT: Ctrl-C; SIGKILL: no warning) and
resumed ends exactly as an uninterrupted run: the same metrics.json, byte for byte, and the same
final weights. A torchrun job whose worker dies restarts from its last checkpoint and completes.

Three kills run in the default suite; ``-m faults`` runs twenty more (CI runs them after
``make test``), and the torchrun restart."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmlgan.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
# The smoke preset at batch 8: 2 BCE epochs of 20 steps, then 3 GAN epochs of 2 iterations, each
# one loader batch of 80 images, so phase 2's data epochs (3 batches of the 256 images) straddle
# its epochs and a resume must continue mid-way through one. A checkpoint after every step.
RUN = ["--preset", "smoke", "--data.batch_size", "8", "--train.max_steps_per_epoch", "20", "--train.gan_epochs", "3",
       "--checkpoint.every_steps", "1", "--checkpoint.every_minutes", "0", "--log.plots", "false"]
TOTAL_STEPS = 46
BCE_STEPS = 40


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _train(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastmlgan", "train", *RUN, "--out", str(out), "--data.root", str(data), *extra]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _result(run: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    state = ckpt.load(run / ckpt.CHECKPOINT_DIR / ckpt.LAST)
    weights = {f"g.{k}": v for k, v in state["generator"].items()}
    weights.update({f"d.{k}": v for k, v in state["discriminator"].items()})
    return (run / "metrics.json").read_bytes(), weights


def _newest_step(run: Path) -> int:
    files = ckpt.step_files(run / ckpt.CHECKPOINT_DIR) if (run / ckpt.CHECKPOINT_DIR).is_dir() else []
    return max((step for step, _ in files), default=0)


def _kill_at(cmd: list[str], run: Path, step: int, sig: int) -> int:
    """Start ``cmd``, send ``sig`` once its newest checkpoint is at ``step`` or later; its exit code."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and _newest_step(run) < step and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    if sig in (signal.SIGTERM, signal.SIGINT) and proc.returncode == 128 + sig:
        name = signal.Signals(sig).name
        assert f"{name}: stopped after step" in err and "--resume" in err, err[-2000:]
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data, run = root / "data", root / "reference"
    proc = _run(_train(run, data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, _result(run)


def _check_kill_and_resume(reference, tmp_path, step: int, sig: int) -> None:
    data, (metrics, weights) = reference
    run = tmp_path / f"killed-{step}-{signal.Signals(sig).name}"
    code = _kill_at(_train(run, data), run, step, sig)
    assert code in (0, 128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGKILL), code
    if code != 0:  # it had not finished when the signal came
        proc = _run(_train(run, data, "--resume", str(run)))
        assert proc.returncode == 0, proc.stderr[-3000:]
    got_metrics, got_weights = _result(run)
    assert got_metrics == metrics, f"metrics.json differs after a {signal.Signals(sig).name} at step {step}"
    assert got_weights.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(got_weights[name], value), f"{name} differs after a {signal.Signals(sig).name} at step {step}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "sig"),
    # The phase-2 signal lands one step after BCE_STEPS + 1, mid-way through a data epoch (3 batches).
    [(7, signal.SIGTERM), (BCE_STEPS - 9, signal.SIGKILL), (BCE_STEPS + 1, signal.SIGTERM)],
    ids=["bce-sigterm", "bce-sigkill", "gan-sigterm"],
)
def test_killed_and_resumed_run_equals_uninterrupted(reference, tmp_path, step, sig):
    _check_kill_and_resume(reference, tmp_path, step, sig)


KILLS = [(random.Random(i).randint(1, TOTAL_STEPS - 1), (signal.SIGTERM, signal.SIGKILL, signal.SIGINT)[i % 3]) for i in range(20)]


@pytest.mark.faults
@pytest.mark.parametrize(("step", "sig"), KILLS, ids=[f"{s}-{signal.Signals(g).name}" for s, g in KILLS])
def test_twenty_kills(reference, tmp_path, step, sig):
    _check_kill_and_resume(reference, tmp_path, step, sig)


def _torchrun(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
            "-m", "fastmlgan.train", *RUN, "--out", str(out), "--data.root", str(data)]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


@pytest.mark.faults
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(reference, tmp_path):
    data = reference[0]
    whole = tmp_path / "whole"
    proc = _run(_torchrun(whole, data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "restarted"
    launcher = subprocess.Popen(_torchrun(run, data, "--max-restarts", "1"), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while launcher.poll() is None and _newest_step(run) < 12:
        time.sleep(0.02)
    workers = _children(launcher.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # rank 1 dies without warning
    output, _ = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, output[-3000:]
    assert "resuming" in output and "from its last checkpoint" in output, output[-3000:]
    # Every rank's random streams were in the checkpoint: the restarted job ends as the whole one.
    (metrics, weights), (want_metrics, want_weights) = _result(run), _result(whole)
    assert metrics == want_metrics
    assert all(torch.equal(weights[k], want_weights[k]) for k in want_weights)
