"""The run's state: where the schedule is (``TrainState``) and the checkpoints that hold it together
with the models (``Checkpointer``).

A checkpoint is one flat dict of plain containers and tensors (format 1), in this order: the
format, the resolved config and the class names; the ``TrainState`` fields (``stream`` is where the
current phase's data stream continues); ``TrainingSteps.state_dict()`` (G, D, f_ext and its source,
both optimizers, the mismatched-label sampler); rank 0's global random state; the AMP scaler; the
baseline and GAN metrics; and ``rank_streams``, every rank's random streams, so that a resumed
multi-process run draws what it would have. ``fastmlgan.train.checkpoint`` writes and reads the
files (atomic, CRC-checked, the last K kept).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastmlgan.config import Config
from fastmlgan.data.stream import BatchStream
from fastmlgan.distributed import DistInfo, all_gather_objects, broadcast_object
from fastmlgan.errors import FastMLGANError
from fastmlgan.train import checkpoint as ckpt
from fastmlgan.train.selection import Selection, checkpoint_state, load_checkpoint_state
from fastmlgan.train.steps import TrainingSteps

logger = logging.getLogger(__name__)

FORMAT = 1
# TrainingSteps.state_dict()'s keys that come before the random state in a checkpoint.
_STEPS_KEYS = (
    "generator", "discriminator", "feature_extractor", "feature_extractor_source", "opt_g", "opt_d", "mismatch_sampler",
)


@dataclasses.dataclass
class TrainState:
    """Where the two-phase schedule is and what it has measured.

    Steps (``global_step``) count G updates in both phases: a batch in phase 1, an iteration of
    ``gan.d_steps`` D updates and one G update in phase 2."""

    phase: str = "bce"  # "bce" (phase 1), "gan" (phase 2) or "done"
    epoch: int = 0  # completed epochs of the current phase
    epoch_step: int = 0  # steps done in the current epoch: a mid-epoch checkpoint resumes there
    global_step: int = 0  # G updates, both phases
    data_epoch: int = 0
    stream_state: dict[str, int] | None = None  # where the current phase's data stream continues (from a checkpoint)
    num_bad: int = 0  # undecodable images substituted in the phases before the current one
    baseline_metrics: dict | None = None
    gan_metrics: dict | None = None


def rank_streams(steps: TrainingSteps) -> dict[str, Any]:
    """This rank's random streams: the global generators' and the mismatched-label sampler's."""
    sampler = steps.mismatch_sampler
    return {"rng": ckpt.rng_state(), "mismatch_sampler": None if sampler is None else sampler.state_dict()}


def load_rank_streams(steps: TrainingSteps, streams: list | None, cfg: Config, info: DistInfo, global_step: int) -> None:
    """This rank's own streams as it left them, when the checkpoint has one per rank of this world
    size; else (another world size, or an older checkpoint) fresh streams for ranks other than 0,
    which keep the global state rank 0 saved."""
    sampler = steps.mismatch_sampler
    if streams is not None and len(streams) == info.world_size:
        ckpt.set_rng_state(streams[info.rank]["rng"])
        if sampler is not None and streams[info.rank]["mismatch_sampler"]:
            sampler.load_state_dict(streams[info.rank]["mismatch_sampler"])
    elif info.rank:
        torch.manual_seed(cfg.train.seed * 1000003 + info.rank + 7 * global_step)
        if sampler is not None:
            sampler.generator.manual_seed(cfg.train.seed * 7919 + info.rank + 7 * global_step)


class Checkpointer:
    """The state of a run (``TrainState`` and ``TrainingSteps``) as a checkpoint dict, written to
    ``checkpoints/`` under ``out_dir`` (rank 0 writes; every rank's random streams go in) and read
    back for a resume or a phase-2 start from a finished phase 1."""

    def __init__(
        self, cfg: Config, info: DistInfo, out_dir: Path, class_names: list[str], steps: TrainingSteps, state: TrainState,
        selection: Selection | None = None,
    ) -> None:
        self.cfg = cfg
        self.info = info
        self.out_dir = out_dir
        self.class_names = class_names
        self.steps = steps
        self.state = state
        self.selection = selection  # thresholds and raw/EMA choice (train.selection), None when off
        self.last: Path | None = None  # the newest checkpoint this run wrote (or resumed from)
        # (step, path) of the checkpoints written (or resumed from); the loss guard knows which of
        # them a later sound loss verified.
        self.written: list[tuple[int, Path]] = []

    def resumed_from(self, path: Path) -> None:
        """Record the checkpoint a resumed run was loaded from as its newest one."""
        self.last = path
        self.written.append((self.state.global_step, path))

    def state_dict(self, stream: BatchStream | None = None) -> dict[str, Any]:
        """The checkpoint dict (without ``rank_streams``); ``stream``: the current phase's live data stream."""
        s, steps = self.state, self.steps.state_dict()
        return {
            "format": FORMAT,
            "config": self.cfg.to_dict(),
            "class_names": list(self.class_names),
            "phase": s.phase,
            "epoch": s.epoch,
            "global_step": s.global_step,
            "data_epoch": s.data_epoch,
            "epoch_step": s.epoch_step,
            # Where the current phase's data stream continues: a resume draws the batches an
            # uninterrupted run would have drawn next.
            "stream": stream.state_dict() if stream is not None else s.stream_state,
            "num_bad": s.num_bad + (stream.num_bad if stream is not None else 0),
            **{k: steps[k] for k in _STEPS_KEYS},
            "rng": ckpt.rng_state(),
            "scaler": steps["scaler"],
            "baseline_metrics": s.baseline_metrics,
            "gan_metrics": s.gan_metrics,
            **checkpoint_state(self.steps, self.selection),  # the weight average, the rows' thresholds
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Resume from a checkpoint: the models, optimizers, schedule position and random streams."""
        if list(saved["class_names"]) != list(self.class_names):
            raise FastMLGANError("the checkpoint was trained on other classes than this dataset has")
        self.steps.load_state_dict(saved)
        s, cfg = self.state, self.cfg
        s.phase = saved["phase"]
        s.epoch = saved["epoch"]
        s.global_step = saved["global_step"]
        s.epoch_step = saved.get("epoch_step", 0)
        s.num_bad = saved.get("num_bad", 0)
        s.stream_state = saved.get("stream")
        # Checkpoints without a stream position (format 1 before it): a fresh epoch after the last.
        s.data_epoch = saved["data_epoch"] if s.stream_state else saved["data_epoch"] + 1
        s.baseline_metrics = saved["baseline_metrics"]
        s.gan_metrics = saved["gan_metrics"]
        if s.phase == "done" and cfg.gan.enable and s.epoch < cfg.train.gan_epochs:
            # A finished run resumed with more GAN epochs (or with the GAN newly enabled): reopen
            # phase 2, on a fresh data epoch. ``epoch`` counts completed GAN epochs (0 after a
            # BCE-only run).
            s.phase, s.gan_metrics, s.epoch_step, s.stream_state = "gan", None, 0, None
            s.data_epoch += 1
        ckpt.set_rng_state(saved["rng"])
        load_rank_streams(self.steps, saved.get("rank_streams"), cfg, self.info, s.global_step)
        if saved.get("scaler"):
            self.steps.scaler.load_state_dict(saved["scaler"])
        load_checkpoint_state(self.steps, self.selection, saved, s.baseline_metrics, s.gan_metrics)

    def start_from_baseline(self, saved: dict[str, Any]) -> None:
        """Start phase 2 from a finished phase 1 (a ``baseline.pt`` state): G, its optimizer,
        f_ext and the baseline metrics. D starts fresh, so ablations with another D shape (the
        unconditional one) share one phase-1 run."""
        if list(saved["class_names"]) != list(self.class_names):
            raise FastMLGANError("the baseline checkpoint was trained on other classes than this dataset has")
        self.steps.load_baseline(saved)
        s = self.state
        s.baseline_metrics = saved["baseline_metrics"]
        s.global_step = saved["global_step"]
        s.data_epoch = saved["data_epoch"] + (0 if saved.get("stream") else 1)
        s.phase, s.epoch, s.gan_metrics = ("gan" if self.cfg.gan.enable else "done"), 0, None
        s.epoch_step, s.stream_state = 0, None
        load_checkpoint_state(self.steps, self.selection, saved, s.baseline_metrics, s.gan_metrics)

    def save(self, stream: BatchStream | None, baseline: bool = False, hint: Callable[[], str] = str) -> bool:
        """Write the state at this step (checkpoints/step-N.pt, last.pt; ``baseline.pt`` for the
        end of phase 1), after checking that every weight is finite: a bad state is never saved
        (``hint()``: what to do then). Every rank calls it. False when checkpoints are off."""
        if not self.cfg.checkpoint.enable:
            return False
        self.steps.sync_batchnorm_statistics()  # the saved G is the one every rank evaluates
        streams = all_gather_objects(rank_streams(self.steps), self.info)
        error = None
        if self.info.is_main:
            s = self.state
            try:
                state = {**self.state_dict(stream), "rank_streams": streams}
                if baseline:
                    ckpt.save_atomic(state, self.out_dir / ckpt.CHECKPOINT_DIR / ckpt.BASELINE)
                else:
                    self.last = ckpt.save_checkpoint(state, self.out_dir, s.global_step, self.cfg.checkpoint.keep)
                    self.written.append((s.global_step, self.last))
            except ckpt.NonFiniteStateError as e:
                error = f"non-finite values in {e.tensor} after step {s.global_step} (phase {s.phase}): not saved. {hint()}"
            except FastMLGANError as e:
                error = str(e)
        # Rank 0's outcome for everyone: the others would otherwise wait in the next collective.
        error = broadcast_object(error, self.info)
        if error:
            raise FastMLGANError(error)
        return True
