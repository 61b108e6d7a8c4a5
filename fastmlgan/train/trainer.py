"""The Trainer: the two-phase schedule of §3.2/§4.1 (epochs, evaluation, logging, checkpoints, stop
control) over typed components. Launched by the train command (``fastmlgan.commands.train``) under
``python`` or ``torchrun``.

A Trainer holds:

- ``splits``, ``train_loader``, ``eval_loader`` (and phase 2's ``gan_loader``): the data, built
  from ``cfg.data`` by ``fastmlgan.data.factory``;
- ``steps``, a ``fastmlgan.train.steps.TrainingSteps``: G, D, f_ext, their optimizers and the G
  and D steps (``steps_class`` picks a subclass); ``steps.feature_cache`` the frozen-feature cache;
- ``state``, a ``fastmlgan.train.state.TrainState``: where the schedule is and what it measured;
- ``checkpointer``, a ``fastmlgan.train.state.Checkpointer``: state dicts and checkpoint files;
- ``loss_guard``, ``stop_control``, ``run_log``: guards, SIGTERM/time checkpoints, the run log.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmlgan.config import Config
from fastmlgan.data.factory import build_iteration_loader, build_loaders, build_splits, per_rank_batch
from fastmlgan.data.stream import BatchStream, IterationLayout
from fastmlgan.distributed import DistInfo, all_gather_arrays, broadcast_object
from fastmlgan.errors import FastMLGANError
from fastmlgan.logs import Progress
from fastmlgan.metrics import compute_metrics, format_table
from fastmlgan.safeio import replace_atomically
from fastmlgan.scoring import predict
from fastmlgan.train import selection as sel
from fastmlgan.train.checkpoint import BASELINE, LAST
from fastmlgan.train.feature_cache import open_feature_cache
from fastmlgan.train.guards import LossGuard, lr_hint
from fastmlgan.train.preemption import StopControl, StopRequested
from fastmlgan.train.runlog import RunLog
from fastmlgan.train.state import Checkpointer, TrainState
from fastmlgan.train.steps import TrainingSteps, uses_channels_last

logger = logging.getLogger(__name__)

PHASES = ("bce", "gan", "done")


class Trainer:
    """The two-phase schedule (§3.2, §4.1) over its components: phase 1's BCE epochs, then phase
    2's WGAN-GP epochs, each epoch's evaluation, logging and checkpoints, resumable at any
    checkpointed step."""

    def __init__(
        self, cfg: Config, info: DistInfo, out_dir: Path, splits=None, steps_class: type[TrainingSteps] = TrainingSteps
    ) -> None:
        """``splits``: pre-built ``Splits`` (the reproduction harness passes its own); read from
        ``cfg.data`` when None. ``steps_class``: the G and D steps (a ``TrainingSteps`` subclass
        changes what a step does, as the harness's control row does)."""
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.out_dir = out_dir

        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        self.splits = splits if splits is not None else build_splits(cfg.data, info)
        self.splits, validation = sel.validation_split(cfg, self.splits, splits is None)  # --data.val_fraction
        self.class_names = self.splits.class_names
        self.channels_last = uses_channels_last(cfg, self.device)
        self.train_loader, self.eval_loader = build_loaders(
            cfg.data, self.splits, info, cfg.train.seed, channels_last=self.channels_last, output="uint8"
        )
        self.gan_loader = None  # phase 2's loader: one batch per iteration, built when phase 2 starts
        self.layout = IterationLayout(
            per_rank_batch(cfg.data.batch_size, info, "data.batch_size"), cfg.gan.d_steps, cfg.gan.negative_sampling
        )
        if cfg.gan.enable and cfg.train.gan_epochs > 0:  # before phase 1, not after it
            held_out = f"{len(validation[0])} more held out by --data.val_fraction {cfg.data.val_fraction:g}" if validation else ""
            self.layout.check_fits(len(self.splits.train), info.world_size, held_out)
        # G's and D's initial weights come from the global stream seeded above.
        self.steps = steps_class(cfg, info, self.layout, self.splits.train, len(self.class_names))
        torch.manual_seed(cfg.train.seed * 1000003 + info.rank)  # per-rank noise streams

        self.state = TrainState()
        # Thresholds and raw/EMA weights chosen on the validation split (train.selection); None when off.
        self.selection = sel.Selection.create(cfg, info, self.splits, validation, self.steps)
        self.checkpointer = Checkpointer(cfg, info, out_dir, self.class_names, self.steps, self.state, self.selection)
        self.stream: BatchStream | None = None  # the current phase's data stream
        self.loss_guard = LossGuard(cfg.train.loss_explosion_ratio)
        self._steps_since_checkpoint = 0
        # SIGTERM/SIGINT and time-based checkpoints, agreed by every rank (a collective: every rank
        # builds its Trainer). Installed while fit() runs.
        self.stop_control = StopControl(info.world_size, cfg.checkpoint.every_minutes, info.is_main)
        self.run_log = None  # metrics.jsonl, TensorBoard, train.log (fastmlgan.train.runlog); rank 0 writes
        self.last_predictions: tuple[np.ndarray, np.ndarray] | None = None  # of the last evaluate()
        if info.is_main:
            logger.info("%s", self.steps.describe())

    def _finish_phase(self, row: str) -> None:
        if self.selection is not None:
            self.selection.finish_phase(self.steps, self.eval_loader, row)

    # ------------------------------------------------------------------------------------------
    # phase 2's set-up

    def build_gan_loader(self):
        """Phase 2's loader: each batch is one whole iteration (``IterationLayout``). With a
        frozen-feature cache only its leading images (G's) are decoded."""
        if self.gan_loader is None:
            pixels = self.layout.pixel_rows if self.steps.feature_cache is not None else None
            self.gan_loader = build_iteration_loader(
                self.cfg.data, self.splits, self.info, self.cfg.train.seed, self.train_loader, self.layout.size,
                self.channels_last, pixels_per_batch=pixels,
            )
        return self.gan_loader

    def start_gan_phase(self) -> None:
        """What phase 2 needs before its first step: f_ext (and its cache) and G's learning rate."""
        steps, cfg = self.steps, self.cfg
        steps.start_gan_phase()
        if cfg.gan.feature_cache and steps.spec.conditional and steps.feature_cache is None:
            steps.feature_cache = open_feature_cache(
                cfg.gan.feature_cache, steps.feature_extractor, self.splits.train,
                dataset=cfg.data.dataset, image_size=cfg.data.image_size, device=self.device,
                amp_dtype=steps.amp_dtype, on_bad_image=cfg.data.on_bad_image, num_workers=cfg.data.num_workers,
                is_main=self.info.is_main, source=steps.feature_source,
            )

    # ------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def predict(self, loader=None) -> tuple[np.ndarray, np.ndarray]:
        """σ(G(x)) and targets for every image of ``loader`` (the evaluation loader by default),
        gathered from all ranks (each image once)."""
        steps = self.steps
        steps.sync_batchnorm_statistics()
        loader = self.eval_loader if loader is None else loader
        s, t = predict(steps.generator, loader, self.device, steps.amp_dtype, steps.memory_format)
        steps.generator.train()
        return all_gather_arrays(s, self.info), all_gather_arrays(t, self.info)

    def evaluate(self) -> dict[str, Any]:
        """The metrics of ``fastmlgan.metrics`` on the evaluation split (§4.1: whole image, one crop).
        The scores and targets stay in ``last_predictions`` (the end-of-run per-class table).

        The schedule calls it at the end of every ``train.eval_every``-th epoch (after counting
        it), at the end of each phase, and once for a phase of no epochs: a subclass that
        overrides it sees the validation curve (``reproduce.runner.SelectingTrainer``)."""
        scores, targets = self.predict()
        self.last_predictions = (scores, targets)
        metrics = compute_metrics(scores, targets) if self.info.is_main else None
        return broadcast_object(metrics, self.info)

    # ------------------------------------------------------------------------------------------
    # state (``fastmlgan.train.state``)

    def state_dict(self) -> dict[str, Any]:
        return self.checkpointer.state_dict(self.stream)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checkpointer.load_state_dict(state)

    def start_from_baseline(self, state: dict[str, Any]) -> None:
        """Start phase 2 from a finished phase 1 (``Checkpointer.start_from_baseline``)."""
        self.checkpointer.start_from_baseline(state)

    def save_checkpoint(self, baseline: bool = False) -> None:
        """Write the state at this step (``Checkpointer.save``); every rank calls it."""
        if not self.checkpointer.save(self.stream, baseline, self._stop_hint):
            return
        self._steps_since_checkpoint = 0
        if not baseline:
            self.stop_control.checkpointed()

    def _stop_hint(self, key: str = "") -> str:
        """What to do about a loss or weights gone wrong: the phase's learning-rate option and the
        last verified checkpoint."""
        hint = lr_hint(self.state.phase, key, self.steps.opt_g, self.steps.opt_d)
        return f"{hint} {self.loss_guard.good_checkpoint(self.checkpointer.written)}"

    # ------------------------------------------------------------------------------------------
    # the schedule

    def _log_metrics(self, record: dict[str, Any], epoch_start: float | None = None, images_per_step: int = 0) -> None:
        if self.info.is_main:
            if self.run_log is None:  # the train command attaches one (TensorBoard, train.log)
                self.run_log = RunLog(self.out_dir)
            self.run_log.write(record, epoch_start, images_per_step)

    def _check_finite(self, values: dict[str, float]) -> None:
        """Stop on a non-finite or exploding logged loss (``fastmlgan.train.guards``), on every rank."""
        key, reason = self.loss_guard.check(values, self.state.phase)
        if self.info.enabled:
            # Every rank must stop together, or the others would wait in the next collective.
            flag = torch.tensor([1.0 if reason else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not reason:
                reason = "a non-finite or exploding loss on another rank"
        if reason:
            raise FastMLGANError(f"{reason} at step {self.state.global_step} (phase {self.state.phase}). {self._stop_hint(key)}")
        self.loss_guard.mark_sound(self.state.global_step)

    def _log_step(self, phase: str, out: dict[str, torch.Tensor], stream: BatchStream, t_start: float) -> str:
        keys = [k for k in out if out[k].numel() == 1]
        # The only host sync of the loop: every logged value in one transfer.
        values = dict(zip(keys, torch.stack([out[k].detach().float().reshape(()) for k in keys]).tolist()))
        self._check_finite(values)
        elapsed = time.perf_counter() - t_start
        record = {
            "phase": phase,
            "epoch": self.state.epoch + 1,
            "step": self.state.global_step,
            **{k: round(v, 6) for k, v in values.items()},
            "data_wait_frac": round(stream.wait_s / elapsed, 4) if elapsed > 0 else 0.0,
            "bad_images": stream.num_bad,
        }
        batches = 1 if phase == "bce" else self.layout.num_batches
        self._log_metrics(record, t_start, batches * self.cfg.data.batch_size)  # adds img/s (global)
        keys = ("bce", "loss_d", "wasserstein", "gp")
        return " ".join(f"{k}={values[k]:.3f}" for k in keys if k in values)

    def _epoch_steps(self, phase: str, stream: BatchStream) -> int:
        """G updates in an epoch of ``phase``: every batch of the loader (phase 1) or every
        iteration-sized batch (phase 2), capped by ``train.max_steps_per_epoch`` batches of B."""
        cap = self.cfg.train.max_steps_per_epoch
        if not cap:
            return len(stream)
        return max(1, min(len(stream), cap if phase == "bce" else cap // self.layout.num_batches))

    def _run_epoch(self, stream: BatchStream) -> None:
        s = self.state
        phase = s.phase
        total = self._epoch_steps(phase, stream)
        epochs = self.cfg.train.bce_epochs if phase == "bce" else self.cfg.train.gan_epochs
        progress = Progress(total, f"{phase} {s.epoch + 1}/{epochs}", enabled=self.info.is_main)
        progress.update(s.epoch_step)  # a resumed epoch continues its count
        stream.wait_s = 0.0
        t_start = time.perf_counter()
        every_steps = self.cfg.checkpoint.every_steps
        for i in range(s.epoch_step, total):
            batch = stream.next()
            out = self.steps.bce_step(batch) if phase == "bce" else self.steps.train_step(batch)
            s.global_step += 1
            s.epoch_step = i + 1
            self._steps_since_checkpoint += 1
            postfix = None
            if (i + 1) % self.cfg.train.log_every == 0 or i + 1 == total:
                postfix = self._log_step(phase, out, stream, t_start)
            progress.update(1, postfix)
            signum, time_due = self.stop_control.poll()
            steps_due = every_steps and self._steps_since_checkpoint >= every_steps
            # A checkpoint within the epoch (its end writes one anyway), or at the step a signal
            # asked to stop at: the resumed run continues with the next batch of this epoch.
            if signum is not None or ((steps_due or time_due) and i + 1 < total):
                self.save_checkpoint()
            if signum is not None:
                progress.close()
                saved = str(self.checkpointer.last) if self.cfg.checkpoint.enable else None
                raise StopRequested(signum, s.global_step, saved)
        progress.close()
        s.data_epoch = stream.data_epoch
        s.epoch += 1
        s.epoch_step = 0
        last = s.epoch == epochs
        if last or s.epoch % self.cfg.train.eval_every == 0:
            metrics = self.evaluate()
            self._log_metrics({"phase": phase, "epoch": s.epoch, "step": s.global_step, "split": "val", **metrics})
            if self.info.is_main:
                logger.info(
                    "%s epoch %d: C-F1 %.2f O-F1 %.2f mAP %.2f labels/img %.2f",
                    phase, s.epoch, metrics["C-F1"], metrics["O-F1"], metrics["mAP"], metrics["avg_labels"],
                )
            if last:
                if phase == "bce":
                    s.baseline_metrics = metrics
                else:
                    s.gan_metrics = metrics

    def fit(self) -> dict[str, Any]:
        """Phase 1 (BCE) then phase 2 (WGAN-GP), resumable at any step that was checkpointed.
        SIGTERM/SIGINT: finish the step, checkpoint, raise ``preemption.StopRequested``."""
        s, train = self.state, self.cfg.train
        self.steps.generator.train()
        self.steps.discriminator.train()
        self.stop_control.install()
        try:
            if s.phase == "bce":
                self.stream = BatchStream(self.train_loader, **(s.stream_state or {"data_epoch": s.data_epoch}))
                while s.epoch < train.bce_epochs:
                    self._run_epoch(self.stream)
                    self.save_checkpoint()
                if s.baseline_metrics is None:  # bce_epochs = 0: the (pretrained) starting point
                    s.baseline_metrics = self.evaluate()
                self._finish_phase("baseline")  # thresholds and raw/EMA on the validation split
                # Phase 2 starts a fresh data epoch.
                s.num_bad += self.stream.num_bad
                s.data_epoch = self.stream.data_epoch + 1
                self.stream, s.stream_state = None, {"data_epoch": s.data_epoch, "position": 0}
                s.phase, s.epoch, s.epoch_step = ("gan" if self.cfg.gan.enable else "done"), 0, 0
                # baseline.pt before the phase-2 step file: a kill between the two resumes from the
                # end of phase 1 and writes both (the other order resumed in phase 2 without it).
                self.save_checkpoint(baseline=True)
                self.save_checkpoint()
            if s.phase == "gan":
                if s.epoch < train.gan_epochs:  # --train.gan_epochs 0 needs no phase-2 loader
                    self.start_gan_phase()
                    self.stream = BatchStream(self.build_gan_loader(), **(s.stream_state or {"data_epoch": s.data_epoch}))
                while s.epoch < train.gan_epochs:
                    self._run_epoch(self.stream)
                    self.save_checkpoint()
                if s.gan_metrics is None:
                    s.gan_metrics = self.evaluate()
                self._finish_phase("gan")
                s.num_bad += self.stream.num_bad if self.stream is not None else 0
                self.stream, s.stream_state = None, None
                s.phase = "done"
                self.save_checkpoint()
        finally:
            self.stop_control.close()
        results = {
            "baseline": s.baseline_metrics,
            "gan": s.gan_metrics,
            "bad_images": s.num_bad,
            "class_names": list(self.class_names),
            **sel.run_results(self.selection),
        }
        if self.info.is_main:
            with replace_atomically(self.out_dir / "metrics.json") as f:  # an OSError: the train command names it
                f.write(json.dumps(results, indent=2) + "\n")
            rows = {self.cfg.model.backbone: s.baseline_metrics}
            if s.gan_metrics is not None:
                rows["+ WGAN-gp"] = s.gan_metrics
            names = {"baseline": self.cfg.model.backbone, "gan": "+ WGAN-gp"}
            rows.update(sel.table_rows(self.selection, names))
            print(format_table(rows, title=f"{self.splits.val.name}: {len(self.splits.val)} images"), flush=True)
            best = sel.best_on_validation(self.selection, names)
            if best is not None:
                weights = self.out_dir / "checkpoints" / (BASELINE if best["row"] == "baseline" else LAST)
                print(f"best recipe on the validation split: {best['name']} (validation C-F1 {best['validation_C-F1']:.2f}); "
                      f"fastmlgan predict {weights} --threshold {best['threshold']} IMAGES", flush=True)
        return results
