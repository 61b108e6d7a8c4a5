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
from fault_runs import BCE_STEPS, RUN, TOTAL_STEPS, _env, _kill_at, _newest_step, _result, _run, _train


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
