"""Training never saves a bad state, and stops on a bad loss naming what to change and which
checkpoint is good (issue 11): NaN weights, an exploding loss, an unwritable run directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlgan.config import build_config
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import FastMLGANError
from fastmlgan.train import checkpoint as ckpt
from fastmlgan.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[3]
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("guards") / "embedded"
    embedded.ensure(root, num_train=256, num_val=128, image_size=40, seed=0)
    return root


def _trainer(data_root, out, **overrides) -> Trainer:
    cfg = build_config({"data.root": str(data_root), "out": str(out), "checkpoint.every_minutes": "0", **overrides}, preset="smoke")
    return Trainer(cfg, CPU, out)


def _saved_states(out: Path) -> list[Path]:
    folder = out / ckpt.CHECKPOINT_DIR
    return sorted(folder.glob("*.pt")) if folder.is_dir() else []


def test_non_finite_weights_are_never_saved(data_root, tmp_path):
    """The last step of an unevaluated epoch makes the weights NaN (an infinite step size, set on
    the optimizer: the config refuses one): the checkpoint is refused, naming the tensor and the
    phase's learning-rate option, and nothing is written."""
    trainer = _trainer(data_root, tmp_path, **{"train.max_steps_per_epoch": "1", "train.eval_every": "5",
                                               "train.bce_epochs": "3", "train.log_every": "5"})
    for group in trainer.steps.opt_g.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(FastMLGANError) as e:
        trainer.fit()
    message = str(e.value)
    assert "not saved" in message and "--optim.bce_lr (now inf)" in message and "generator/" in message, message
    assert "\n" not in message
    assert _saved_states(tmp_path) == []


def test_exploding_loss_stops_and_names_the_verified_checkpoint(data_root, tmp_path):
    """Four sound steps, then the step size becomes 1e9: the update of step 5 breaks the weights,
    the loss of step 6 (computed with them) explodes. The checkpoint named is step 4's: step 5's
    was written from the bad update and no later sound loss vouches for it."""
    trainer = _trainer(data_root, tmp_path, **{"train.log_every": "1", "checkpoint.every_steps": "1",
                                               "checkpoint.keep": "5"})
    step = trainer.steps.bce_step

    def step_then_break(batch):
        out = step(batch)
        if trainer.state.global_step + 1 == 4:  # bce_step runs before the counter moves: this was step 4
            for group in trainer.steps.opt_g.param_groups:
                group["lr"] = 1e9
        return out

    trainer.steps.bce_step = step_then_break
    with pytest.raises(FastMLGANError) as e:
        trainer.fit()
    message = str(e.value)
    assert "at step 6 (phase bce)" in message and "--optim.bce_lr" in message, message
    assert "exploding loss" in message or "non-finite loss" in message, message
    assert "step-000000004.pt (step 4)" in message, message
    # Every checkpoint on disk holds finite weights, and the named one loads.
    for path in _saved_states(tmp_path):
        state = ckpt.load(path)
        assert all(torch.isfinite(t).all() for t in state["generator"].values() if t.is_floating_point()), path


def test_a_finite_blow_up_no_longer_runs_to_exit_zero(data_root, tmp_path):
    """Issue 11: --optim.bce_lr 1e9 ended with a loss near 2e9 and exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastmlgan", "train", "--preset", "smoke", "--optim.bce_lr", "1e9", "--train.log_every", "1",
         "--data.root", str(data_root), "--out", str(tmp_path / "run"), "--log.plots", "false"],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "--optim.bce_lr (now 1000000000.0)" in error, error


def test_an_unwritable_run_directory_is_one_line(data_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "fastmlgan", "train", "--preset", "smoke", "--data.root", str(data_root),
         "--out", str(blocker / "run")],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"--out {blocker / 'run'}: cannot write the run directory" in proc.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# fastmlgan.train.guards by hand


def test_loss_guard_explosion_against_a_hand_median():
    from fastmlgan.train.guards import LossGuard

    guard = LossGuard(explosion_ratio=10.0)
    for value in (1.0, 3.0, 2.0):  # |.| history; the median is 2
        assert guard.check({"loss_d": -value}, "gan") == ("", "")
    assert guard.check({"loss_d": 19.9}, "gan") == ("", "")  # 19.9 < 10 x 2; history now 1, 3, 2, 19.9
    key, why = guard.check({"loss_d": -25.1}, "gan")  # median of 1, 2, 3, 19.9 = 2.5: 25.1 > 25
    assert key == "loss_d" and "over 10 times its running median 2.5" in why and "-25.1" in why
    # Another phase has its own history: too short to judge.
    assert guard.check({"loss_d": 1e9}, "bce") == ("", "")
    assert LossGuard(0).check({"bce": 1e30}, "bce") == ("", "")  # ratio 0: off
    key, why = guard.check({"bce": 1.0, "gp": float("nan")}, "gan")
    assert key == "gp" and why.startswith("non-finite loss")


def test_good_checkpoint_is_the_newest_verified_one(tmp_path):
    from fastmlgan.train.guards import LossGuard

    paths = [tmp_path / f"step-{s}.pt" for s in (10, 20, 30)]
    for p in paths[:2]:
        p.write_bytes(b"x")  # step-30 was pruned (or never written)
    guard = LossGuard(10.0)
    assert guard.good_checkpoint([]) == "No checkpoint was written before it."
    guard.mark_sound(20)  # verifies step 10 only: step 20's weights gave no loss yet
    assert f"--resume {paths[0]}" in guard.good_checkpoint(list(zip((10, 20, 30), paths)))
    guard.mark_sound(35)  # step 30 verified but not on disk: step 20 is the newest on disk
    assert f"--resume {paths[1]}" in guard.good_checkpoint(list(zip((10, 20, 30), paths)))
    guard.mark_sound(5)
    assert "No checkpoint still on disk was verified" in guard.good_checkpoint(list(zip((10, 20, 30), paths)))


def test_lr_hint_names_the_phase_and_loss_option():
    from fastmlgan.train.guards import lr_hint

    g = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    d = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    assert lr_hint("bce", "bce", g, d).startswith("Lower --optim.bce_lr (now 0.001)")
    assert lr_hint("gan", "gp", g, d).startswith("Lower --optim.d_lr (now 0.0002)")
    assert lr_hint("gan", "loss_g", g, d).startswith("Lower --optim.g_lr (now 0.001)")
