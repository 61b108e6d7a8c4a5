"""The fault tests' training run and its kill helpers (tests/integration/test_faults.py, and the EMA
resume test in tests/unit/train/test_ema.py): a module of tests/helpers, importable from any test
file however pytest collects it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
