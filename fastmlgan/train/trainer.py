"""The Trainer: the G and D steps of §3, the two-phase schedule of §3.2/§4.1, evaluation and
checkpoints. Launched by the train command (``fastmlgan.commands.train``) under ``python`` or
``torchrun``."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastmlgan.config import Config
from fastmlgan.data.factory import build_iteration_loader, build_loaders, build_splits, per_rank_batch
from fastmlgan.data.stream import BatchStream, IterationLayout
from fastmlgan.distributed import (
    DistInfo,
    all_gather_arrays,
    all_gather_objects,
    allreduce_gradients,
    broadcast_module,
    broadcast_object,
)
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.kernels import gradient_penalty
from fastmlgan.logs import Progress
from fastmlgan.losses import GanSpec, bce_loss, discriminator_loss, generator_loss, gradient_penalty_autograd
from fastmlgan.metrics import compute_metrics, format_table
from fastmlgan.models import Discriminator, build_feature_extractor, build_generator
from fastmlgan.models.chunked_norm import batch_norm_chunks, make_chunkable
from fastmlgan.safeio import replace_atomically
from fastmlgan.scoring import amp_dtype, inputs_to_device, predict, to_device
from fastmlgan.train import checkpoint as ckpt
from fastmlgan.train.feature_cache import open_feature_cache
from fastmlgan.train.guards import LossGuard, lr_hint
from fastmlgan.train.negatives import MismatchedLabelSampler
from fastmlgan.train.preemption import StopControl, StopRequested
from fastmlgan.train.runlog import RunLog

logger = logging.getLogger(__name__)

PHASES = ("bce", "gan", "done")


def _features(feature_extractor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f_ext(x) in fp32 (D's input precision)."""
    return feature_extractor(x).float()


def _logits(generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return generator(x).float()


def _log_vector(out: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], torch.Tensor]:
    """A step's logged values as one fp32 vector, taken right after the step.

    One copy, so that reading them later needs one host sync for all keys, and so that a later
    CUDA-graph replay (``compile.mode=reduce-overhead`` reuses its output buffers) cannot
    overwrite them before they are logged."""
    keys = tuple(k for k in out if out[k].numel() == 1)
    return keys, torch.stack([out[k].detach().float().reshape(()) for k in keys])


class Trainer:
    """G, D and f_ext with their optimizers, the G and D steps, the two-phase schedule (§3.2,
    §4.1), evaluation and checkpoints.

    Steps (``global_step``) count G updates in both phases: a batch in phase 1, an iteration of
    ``gan.d_steps`` D updates and one G update in phase 2."""

    def __init__(self, cfg: Config, info: DistInfo, out_dir: Path, splits=None) -> None:
        """``splits``: pre-built ``Splits`` (the reproduction harness passes its own); read from
        ``cfg.data`` when None."""
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.out_dir = out_dir
        self.spec = GanSpec.from_config(cfg.gan)

        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        self.splits = splits if splits is not None else build_splits(cfg.data, info)
        self.class_names = self.splits.class_names
        num_labels = len(self.class_names)
        channels_last = cfg.model.channels_last and self.device.type == "cuda" and cfg.model.backbone != "mlp"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.channels_last = channels_last
        self.train_loader, self.eval_loader = build_loaders(
            cfg.data, self.splits, info, cfg.train.seed, channels_last=channels_last
        )
        self.gan_loader = None  # phase 2's loader: one batch per iteration, built when phase 2 starts
        self.layout = IterationLayout(
            per_rank_batch(cfg.data.batch_size, info, "data.batch_size"), cfg.gan.d_steps, cfg.gan.negative_sampling
        )
        if cfg.gan.enable and cfg.train.gan_epochs > 0:  # before phase 1, not after it
            self.layout.check_fits(len(self.splits.train), info.world_size)
        self.mismatch_sampler = (
            MismatchedLabelSampler(self.splits.train.labels, seed=cfg.train.seed * 7919 + info.rank)
            if cfg.gan.enable and cfg.gan.negative_sampling
            else None
        )

        in_dim = getattr(self.splits.train, "feature_dim", None)  # feature-vector data (mlp backbone)
        self.generator = build_generator(
            cfg.model.backbone, num_labels, cfg.model.pretrained, width=cfg.model.width, depth=cfg.model.depth, in_dim=in_dim,
            image_size=None if in_dim else cfg.data.image_size,
        ).to(self.device)
        # Phase 2 runs G's no-grad forwards of all D updates as one batch, each update's images
        # normalised as their own BatchNorm batch (fastmlgan.models.chunked_norm).
        make_chunkable(self.generator)
        self.generator = self.generator.to(memory_format=self.memory_format)
        # §4.1: f_ext is the ImageNet-pretrained generator without its output layer, frozen. With
        # no pretrained weights it is G's trunk frozen at the end of the BCE phase instead. An
        # unconditional D (Table 3 (d)) never sees it, so then there is none.
        self.feature_extractor = None
        self.feature_source = ""
        self.feature_cache = None
        if cfg.model.pretrained and self.spec.conditional and cfg.gan.enable:
            self._freeze_feature_extractor(f"pretrained:{cfg.model.pretrained}")
        self.discriminator = Discriminator(
            num_labels,
            self.generator.feature_dim,
            proj_dim=cfg.gan.proj_dim,
            hidden_dim=cfg.gan.hidden_dim,
            num_layers=cfg.gan.num_layers,
            conditional=cfg.gan.conditional,
            negative_slope=cfg.gan.negative_slope,
        ).to(self.device)

        # Fused Adam (one kernel for all parameters) where the device has it; it also takes the
        # fp16 loss scale on the device, so GradScaler.step never syncs with the host.
        fused = {"fused": True} if self.device.type == "cuda" else {}
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        self.opt_g = torch.optim.Adam(
            self.generator.parameters(), lr=cfg.optim.bce_lr, betas=betas, weight_decay=cfg.optim.weight_decay, **fused
        )
        self.opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=cfg.optim.d_lr, betas=betas, weight_decay=cfg.optim.weight_decay, **fused
        )
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
        # Wrapping and compilation happen once, here; state dicts always come from the plain modules.
        #  - one process: each step (BCE, G, the whole D step with its penalty, f_ext's and G's
        #    no-grad forwards) is one fullgraph torch.compile region.
        #  - several processes, eager: G and D in DDP (all-reduce overlapped with backward).
        #  - several processes, compiled: G is compiled as a module and wrapped in DDP (torch's
        #    recommended order): DDPOptimizer splits G's graph at DDP's gradient buckets, so each
        #    bucket's all-reduce starts while the rest of the backward runs. The loss around G
        #    (a few small ops) stays eager: dynamo cannot trace DDP's forward inside a fullgraph
        #    region ("Unsupported method call Logger.set_runtime_stats_and_log", torch 2.14). D's
        #    step stays one compiled region on the plain module, its gradients averaged after
        #    backward in flat buckets (allreduce_gradients): D is ~2M parameters and ~1% of an
        #    iteration's time, so there is nothing to overlap.
        self.compiled = cfg.compile.enable
        options = {"fullgraph": True, "mode": cfg.compile.mode}
        compiled = torch.compile if self.compiled else (lambda fn, **_: fn)
        self.g_model: nn.Module = self.generator
        self.d_model: nn.Module = self.discriminator
        self._bce_loss, self._g_loss, self._logits = (compiled(f, **options) for f in (bce_loss, generator_loss, _logits))
        self._d_loss, self._features = compiled(discriminator_loss, **options), compiled(_features, **options)
        self._allreduce_after_backward: set[nn.Module] = set()
        if info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = {"device_ids": ids, "bucket_cap_mb": cfg.dist.bucket_cap_mb}
            if self.compiled:
                if cfg.dist.bucket_cap_mb < 1:
                    raise ConfigError(
                        f"--dist.bucket_cap_mb {cfg.dist.bucket_cap_mb} with --compile.enable under torchrun: DDP's "
                        "first bucket is 1 MB and torch.compile's DDPOptimizer needs the others at least as large; use >= 1"
                    )
                self.generator.compile(mode=cfg.compile.mode)
                self._bce_loss, self._g_loss, self._logits = bce_loss, generator_loss, _logits
                broadcast_module(self.discriminator)
                self._allreduce_after_backward.add(self.discriminator)
            else:
                self.d_model = DDP(self.discriminator, **ddp)
            self.g_model = DDP(self.generator, **ddp)
        self.penalty = gradient_penalty if cfg.gan.penalty == "explicit" else gradient_penalty_autograd

        self.amp_dtype = amp_dtype(cfg.precision.amp, self.device)
        # fp16 gradients of G's activations underflow without loss scaling; bf16 needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        torch.manual_seed(cfg.train.seed * 1000003 + info.rank)  # per-rank noise streams
        self.phase = "bce"
        self.epoch = 0  # completed epochs of the current phase
        self.epoch_step = 0  # steps done in the current epoch: a mid-epoch checkpoint resumes there
        self.global_step = 0  # G updates, both phases
        self.data_epoch = 0
        self.stream: BatchStream | None = None  # the current phase's data stream
        self.stream_state: dict[str, int] | None = None  # where it continues (from a checkpoint)
        self.num_bad = 0  # undecodable images substituted in the phases before the current one
        self.last_checkpoint: Path | None = None  # the newest checkpoint this run wrote (or resumed from)
        # (step, path) of the checkpoints written (or resumed from); the guard knows which of them
        # a later sound loss verified.
        self.checkpoints: list[tuple[int, Path]] = []
        self.loss_guard = LossGuard(cfg.train.loss_explosion_ratio)
        self._steps_since_checkpoint = 0
        # SIGTERM/SIGINT and time-based checkpoints, agreed by every rank (a collective: every rank
        # builds its Trainer). Installed while fit() runs.
        self.stop_control = StopControl(info.world_size, cfg.checkpoint.every_minutes, info.is_main)
        self.baseline_metrics: dict | None = None
        self.gan_metrics: dict | None = None
        self.run_log = None  # metrics.jsonl, TensorBoard, train.log (fastmlgan.train.runlog); rank 0 writes
        self.last_predictions: tuple[np.ndarray, np.ndarray] | None = None  # of the last evaluate()
        if info.is_main:
            logger.info(
                "G: %s (%d params, pretrained=%r), D: %d params, device %s, world size %d, amp %s, compile %s",
                cfg.model.backbone,
                sum(p.numel() for p in self.generator.parameters()),
                cfg.model.pretrained or None,
                sum(p.numel() for p in self.discriminator.parameters()),
                self.device,
                info.world_size,
                self.amp_dtype,
                cfg.compile.mode if cfg.compile.enable else "off",
            )

    # ------------------------------------------------------------------------------------------
    # set-up helpers

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _sync_batchnorm_statistics(self) -> None:
        """Give every rank rank 0's BatchNorm running statistics. DDP copies them into each rank
        before a forward, after which each rank updates them from its own batch: without this,
        ranks would evaluate (and freeze f_ext) with slightly different models."""
        if self.info.enabled:
            broadcast_module(self.generator, buffers_only=True)

    def _freeze_feature_extractor(self, source: str) -> None:
        self._sync_batchnorm_statistics()
        self.feature_extractor = build_feature_extractor(self.generator, source).to(self.device)
        self.feature_source = source
        if self.info.is_main:
            logger.info("f_ext frozen from %s", source)

    def _images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs_to_device(batch, self.device, self.memory_format)

    def build_gan_loader(self):
        """Phase 2's loader: each batch is one whole iteration (``IterationLayout``). With a
        frozen-feature cache only its leading images (G's) are decoded."""
        if self.gan_loader is None:
            pixels = self.layout.pixel_rows if self.feature_cache is not None else None
            self.gan_loader = build_iteration_loader(
                self.cfg.data, self.splits, self.info, self.cfg.train.seed, self.train_loader, self.layout.size,
                self.channels_last, pixels_per_batch=pixels,
            )
        return self.gan_loader

    def start_gan_phase(self) -> None:
        """What phase 2 needs before its first step: f_ext (and its cache) and G's learning rate."""
        if self.spec.conditional and self.feature_extractor is None:
            self._freeze_feature_extractor("phase1")
        if self.cfg.gan.feature_cache and self.spec.conditional and self.feature_cache is None:
            self.feature_cache = open_feature_cache(self)
        for group in self.opt_g.param_groups:
            group["lr"] = self.cfg.optim.g_lr

    # ------------------------------------------------------------------------------------------
    # the steps: each a function of (models, batch) followed by its optimizer update

    def bce_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Phase 1 (§3.2): one Adam step of G on L_logistic."""
        self._mark_step()
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            out = self._bce_loss(self.g_model, {"x": self._images(batch), "y": to_device(batch["labels"], self.device)})
        self.scaler.scale(out["loss_g"]).backward()
        self._step_generator()
        return out

    def discriminator_step(self, d_batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """One D update on eq. (4) from what G and f_ext made of its three batches (matched,
        generated, mismatched pairs; see ``losses.discriminator_loss``). D runs in fp32."""
        self.opt_d.zero_grad(set_to_none=True)
        out = self._d_loss(self.d_model, d_batch, self.spec, self.penalty)
        out["loss_d"].backward()
        self._sync_gradients(self.discriminator)
        self.opt_d.step()
        return out

    def generator_step(self, g_batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """One G update on eqs. (2)–(3) from images ``x``, labels ``y`` and features ``z``.
        Only G's parameters receive gradients."""
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            out = self._g_loss(self.discriminator, self.g_model, g_batch, self.spec)
        self.scaler.scale(out["loss_g"]).backward(inputs=list(self.generator.parameters()))
        self._step_generator()
        return out

    @torch.no_grad()
    def iteration_features(self, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor | None:
        """f_ext on every image of a phase-2 iteration, fp32 (R, feature_dim); None for an
        unconditional D. From the frozen-feature cache when there is one, else one inference
        forward over all the iteration's images (``gan.feature_batch`` at a time)."""
        if not self.spec.conditional:
            return None
        if self.feature_cache is not None:
            return self.feature_cache.lookup(batch["index"], batch["crop"], self.device)
        size = self.cfg.gan.feature_batch or images.shape[0]
        with self.autocast():
            parts = [self._features(self.feature_extractor, x) for x in torch.split(images, size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def generated_logits(self, images: torch.Tensor) -> torch.Tensor:
        """G's logits (fp32, no gradients) on the generated pairs of all D updates in one forward;
        each update's B images are their own BatchNorm batch, as in separate forwards."""
        with self.autocast(), batch_norm_chunks(self.generator, self.layout.d_steps):
            return self._logits(self.generator, images)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One phase-2 iteration (§4.1) from one loader batch laid out by ``IterationLayout``:
        ``gan.d_steps`` D updates, then one G update.

        f_ext runs once on all of the iteration's images and G once (no gradients) on all the
        generated pairs' images; then each D update runs D alone, with its own Gumbel noise,
        interpolation ε and mismatched label sets, in the order of separate updates."""
        lay = self.layout
        self._mark_step()
        images = self._images(batch)
        host_labels = batch["labels"]
        if self.feature_cache is not None:
            host_labels = self.feature_cache.stand_in_labels(batch["index"], host_labels)
        labels = to_device(host_labels, self.device)
        z = self.iteration_features(batch, images)
        logits = self.generated_logits(images[lay.generated_rows()])

        def rows(t: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
            return None if t is None else t[sl]

        d_log = None
        for k in range(lay.d_steps):
            gen = lay.generated_rows(k)
            d_batch = {
                "matched_y": labels[lay.matched_rows(k)],
                "matched_z": rows(z, lay.matched_rows(k)),
                "generated_logits": logits[k * lay.batch_size : (k + 1) * lay.batch_size],
                "generated_real_y": labels[gen],
                "generated_z": rows(z, gen),
            }
            if self.spec.negative_sampling:
                mm = lay.mismatched_rows(k)
                mismatched = self.mismatch_sampler.sample(host_labels[mm])
                if self.device.type == "cuda":
                    mismatched = mismatched.pin_memory()  # a pageable copy would block the host
                d_batch["mismatched_y"] = to_device(mismatched, self.device)
                d_batch["mismatched_z"] = rows(z, mm)
            d_log = _log_vector(self.discriminator_step(d_batch))
        g = lay.generator_rows()
        g_out = self.generator_step({"x": images[g], "y": labels[g], "z": rows(z, g)})
        g_keys, g_values = _log_vector(g_out)
        return {**dict(zip(d_log[0], d_log[1])), **dict(zip(g_keys, g_values))}

    def _step_generator(self) -> None:
        self._sync_gradients(self.generator)
        self.scaler.step(self.opt_g)
        self.scaler.update()

    def _mark_step(self) -> None:
        # CUDA graphs (compile.mode=reduce-overhead) reuse their output buffers: tell them where a
        # new iteration starts. Within an iteration, later graphs read earlier graphs' outputs
        # (f_ext's features, G's logits), so the mark is once per iteration, not per graph.
        if self.compiled and self.cfg.compile.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _sync_gradients(self, module: nn.Module) -> None:
        """Average the gradients of a module that is not in DDP (D in compiled multi-process runs)."""
        if module in self._allreduce_after_backward:
            allreduce_gradients(module.parameters(), self.info.world_size)

    # ------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def predict(self) -> tuple[np.ndarray, np.ndarray]:
        """σ(G(x)) and targets for every evaluation image, gathered from all ranks (each image once)."""
        self._sync_batchnorm_statistics()
        s, t = predict(self.generator, self.eval_loader, self.device, self.amp_dtype, self.memory_format)
        self.generator.train()
        return all_gather_arrays(s, self.info), all_gather_arrays(t, self.info)

    def evaluate(self) -> dict[str, Any]:
        """The metrics of ``fastmlgan.metrics`` on the evaluation split (§4.1: whole image, one crop).
        The scores and targets stay in ``last_predictions`` (the end-of-run per-class table)."""
        scores, targets = self.predict()
        self.last_predictions = (scores, targets)
        metrics = compute_metrics(scores, targets) if self.info.is_main else None
        return broadcast_object(metrics, self.info)

    # ------------------------------------------------------------------------------------------
    # state

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": self.cfg.to_dict(),
            "class_names": list(self.class_names),
            "phase": self.phase,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "data_epoch": self.data_epoch,
            "epoch_step": self.epoch_step,
            # Where the current phase's data stream continues: a resume draws the batches an
            # uninterrupted run would have drawn next.
            "stream": self.stream.state_dict() if self.stream is not None else self.stream_state,
            "num_bad": self.num_bad + (self.stream.num_bad if self.stream is not None else 0),
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "feature_extractor": None if self.feature_extractor is None else self.feature_extractor.state_dict(),
            "feature_extractor_source": self.feature_source,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "mismatch_sampler": None if self.mismatch_sampler is None else self.mismatch_sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "baseline_metrics": self.baseline_metrics,
            "gan_metrics": self.gan_metrics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["class_names"]) != list(self.class_names):
            raise FastMLGANError("the checkpoint was trained on other classes than this dataset has")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if state["feature_extractor"] is not None:
            self._freeze_feature_extractor(state["feature_extractor_source"])
            self.feature_extractor.load_state_dict(state["feature_extractor"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.mismatch_sampler is not None and state.get("mismatch_sampler"):
            self.mismatch_sampler.load_state_dict(state["mismatch_sampler"])
        self.phase = state["phase"]
        self.epoch = state["epoch"]
        self.global_step = state["global_step"]
        self.epoch_step = state.get("epoch_step", 0)
        self.num_bad = state.get("num_bad", 0)
        self.stream_state = state.get("stream")
        # Checkpoints without a stream position (format 1 before it): a fresh epoch after the last.
        self.data_epoch = state["data_epoch"] if self.stream_state else state["data_epoch"] + 1
        self.baseline_metrics = state["baseline_metrics"]
        self.gan_metrics = state["gan_metrics"]
        if self.phase == "done" and self.cfg.gan.enable and self.epoch < self.cfg.train.gan_epochs:
            # A finished run resumed with more GAN epochs (or with the GAN newly enabled): reopen
            # phase 2, on a fresh data epoch. ``epoch`` counts completed GAN epochs (0 after a
            # BCE-only run).
            self.phase, self.gan_metrics, self.epoch_step, self.stream_state = "gan", None, 0, None
            self.data_epoch += 1
        ckpt.set_rng_state(state["rng"])
        streams = state.get("rank_streams")
        if streams is not None and len(streams) == self.info.world_size:
            # This rank's own streams, as it left them.
            ckpt.set_rng_state(streams[self.info.rank]["rng"])
            if self.mismatch_sampler is not None and streams[self.info.rank]["mismatch_sampler"]:
                self.mismatch_sampler.load_state_dict(streams[self.info.rank]["mismatch_sampler"])
        elif self.info.rank:
            # Another world size (or an older checkpoint): the other ranks get fresh streams of their own.
            torch.manual_seed(self.cfg.train.seed * 1000003 + self.info.rank + 7 * self.global_step)
            if self.mismatch_sampler is not None:
                self.mismatch_sampler.generator.manual_seed(
                    self.cfg.train.seed * 7919 + self.info.rank + 7 * self.global_step
                )
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def start_from_baseline(self, state: dict[str, Any]) -> None:
        """Start phase 2 from a finished phase 1 (a ``baseline.pt`` state): G, its optimizer,
        f_ext and the baseline metrics. D starts fresh, so ablations with another D shape (the
        unconditional one) share one phase-1 run."""
        if list(state["class_names"]) != list(self.class_names):
            raise FastMLGANError("the baseline checkpoint was trained on other classes than this dataset has")
        self.generator.load_state_dict(state["generator"])
        # Adam keeps the tensors it is given and updates them in place: copy them, so that one
        # baseline state can start any number of phase-2 runs.
        self.opt_g.load_state_dict(copy.deepcopy(state["opt_g"]))
        if state["feature_extractor"] is not None and self.spec.conditional:
            self._freeze_feature_extractor(state["feature_extractor_source"])
            self.feature_extractor.load_state_dict(state["feature_extractor"])
        self.baseline_metrics = state["baseline_metrics"]
        self.global_step = state["global_step"]
        self.data_epoch = state["data_epoch"] + (0 if state.get("stream") else 1)
        self.phase, self.epoch, self.gan_metrics = ("gan" if self.cfg.gan.enable else "done"), 0, None
        self.epoch_step, self.stream_state = 0, None

    def save_checkpoint(self, baseline: bool = False) -> None:
        """Write the state at this step (checkpoints/step-N.pt, last.pt; ``baseline.pt`` for the
        end of phase 1), after checking that every weight is finite: a bad state is never saved."""
        if not self.cfg.checkpoint.enable:
            return
        self._sync_batchnorm_statistics()  # the saved G is the one every rank evaluates
        # Every rank's random streams, so that a resumed multi-process run draws what it would have.
        rank_streams = all_gather_objects(self._rank_streams(), self.info)
        error = None
        if self.info.is_main:
            folder = self.out_dir / ckpt.CHECKPOINT_DIR
            try:
                state = {**self.state_dict(), "rank_streams": rank_streams}
                if baseline:
                    ckpt.save_atomic(state, folder / ckpt.BASELINE)
                else:
                    self.last_checkpoint = ckpt.save_checkpoint(state, self.out_dir, self.global_step, self.cfg.checkpoint.keep)
                    self.checkpoints.append((self.global_step, self.last_checkpoint))
            except ckpt.NonFiniteStateError as e:
                error = (
                    f"non-finite values in {e.tensor} after step {self.global_step} (phase {self.phase}): "
                    f"not saved. {self._stop_hint()}"
                )
            except FastMLGANError as e:
                error = str(e)
        # Rank 0's outcome for everyone: the others would otherwise wait in the next collective.
        error = broadcast_object(error, self.info)
        if error:
            raise FastMLGANError(error)
        self._steps_since_checkpoint = 0
        if not baseline:
            self.stop_control.checkpointed()

    def _rank_streams(self) -> dict[str, Any]:
        return {
            "rng": ckpt.rng_state(),
            "mismatch_sampler": None if self.mismatch_sampler is None else self.mismatch_sampler.state_dict(),
        }

    def _stop_hint(self, key: str = "") -> str:
        """What to do about a loss or weights gone wrong: the phase's learning-rate option and the
        last verified checkpoint."""
        hint = lr_hint(self.phase, key, self.opt_g, self.opt_d)
        return f"{hint} {self.loss_guard.good_checkpoint(self.checkpoints)}"

    # ------------------------------------------------------------------------------------------
    # the schedule

    def _log_metrics(self, record: dict[str, Any], epoch_start: float | None = None, images_per_step: int = 0) -> None:
        if self.info.is_main:
            if self.run_log is None:  # the train command attaches one (TensorBoard, train.log)
                self.run_log = RunLog(self.out_dir)
            self.run_log.write(record, epoch_start, images_per_step)

    def _check_finite(self, values: dict[str, float]) -> None:
        """Stop on a non-finite or exploding logged loss (``fastmlgan.train.guards``), on every rank."""
        key, reason = self.loss_guard.check(values, self.phase)
        if self.info.enabled:
            # Every rank must stop together, or the others would wait in the next collective.
            flag = torch.tensor([1.0 if reason else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not reason:
                reason = "a non-finite or exploding loss on another rank"
        if reason:
            raise FastMLGANError(f"{reason} at step {self.global_step} (phase {self.phase}). {self._stop_hint(key)}")
        self.loss_guard.mark_sound(self.global_step)

    def _log_step(self, phase: str, out: dict[str, torch.Tensor], stream: BatchStream, t_start: float) -> str:
        keys = [k for k in out if out[k].numel() == 1]
        # The only host sync of the loop: every logged value in one transfer.
        values = dict(zip(keys, torch.stack([out[k].detach().float().reshape(()) for k in keys]).tolist()))
        self._check_finite(values)
        elapsed = time.perf_counter() - t_start
        record = {
            "phase": phase,
            "epoch": self.epoch + 1,
            "step": self.global_step,
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
        phase = self.phase
        total = self._epoch_steps(phase, stream)
        epochs = self.cfg.train.bce_epochs if phase == "bce" else self.cfg.train.gan_epochs
        progress = Progress(total, f"{phase} {self.epoch + 1}/{epochs}", enabled=self.info.is_main)
        progress.update(self.epoch_step)  # a resumed epoch continues its count
        stream.wait_s = 0.0
        t_start = time.perf_counter()
        every_steps = self.cfg.checkpoint.every_steps
        for i in range(self.epoch_step, total):
            batch = stream.next()
            out = self.bce_step(batch) if phase == "bce" else self.train_step(batch)
            self.global_step += 1
            self.epoch_step = i + 1
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
                saved = str(self.last_checkpoint) if self.cfg.checkpoint.enable else None
                raise StopRequested(signum, self.global_step, saved)
        progress.close()
        self.data_epoch = stream.data_epoch
        self.epoch += 1
        self.epoch_step = 0
        last = self.epoch == epochs
        if last or self.epoch % self.cfg.train.eval_every == 0:
            metrics = self.evaluate()
            self._log_metrics({"phase": phase, "epoch": self.epoch, "step": self.global_step, "split": "val", **metrics})
            if self.info.is_main:
                logger.info(
                    "%s epoch %d: C-F1 %.2f O-F1 %.2f mAP %.2f labels/img %.2f",
                    phase, self.epoch, metrics["C-F1"], metrics["O-F1"], metrics["mAP"], metrics["avg_labels"],
                )
            if last:
                if phase == "bce":
                    self.baseline_metrics = metrics
                else:
                    self.gan_metrics = metrics

    def fit(self) -> dict[str, Any]:
        """Phase 1 (BCE) then phase 2 (WGAN-GP), resumable at any step that was checkpointed.
        SIGTERM/SIGINT: finish the step, checkpoint, raise ``preemption.StopRequested``."""
        self.generator.train()
        self.discriminator.train()
        self.stop_control.install()
        try:
            if self.phase == "bce":
                self.stream = BatchStream(self.train_loader, **(self.stream_state or {"data_epoch": self.data_epoch}))
                while self.epoch < self.cfg.train.bce_epochs:
                    self._run_epoch(self.stream)
                    self.save_checkpoint()
                if self.baseline_metrics is None:  # bce_epochs = 0: the (pretrained) starting point
                    self.baseline_metrics = self.evaluate()
                # Phase 2 starts a fresh data epoch.
                self.num_bad += self.stream.num_bad
                self.data_epoch = self.stream.data_epoch + 1
                self.stream, self.stream_state = None, {"data_epoch": self.data_epoch, "position": 0}
                self.phase, self.epoch, self.epoch_step = ("gan" if self.cfg.gan.enable else "done"), 0, 0
                # baseline.pt before the phase-2 step file: a kill between the two resumes from the
                # end of phase 1 and writes both (the other order resumed in phase 2 without it).
                self.save_checkpoint(baseline=True)
                self.save_checkpoint()
            if self.phase == "gan":
                if self.epoch < self.cfg.train.gan_epochs:  # --train.gan_epochs 0 needs no phase-2 loader
                    self.start_gan_phase()
                    state = self.stream_state or {"data_epoch": self.data_epoch}
                    self.stream = BatchStream(self.build_gan_loader(), **state)
                while self.epoch < self.cfg.train.gan_epochs:
                    self._run_epoch(self.stream)
                    self.save_checkpoint()
                if self.gan_metrics is None:
                    self.gan_metrics = self.evaluate()
                self.num_bad += self.stream.num_bad if self.stream is not None else 0
                self.stream, self.stream_state = None, None
                self.phase = "done"
                self.save_checkpoint()
        finally:
            self.stop_control.close()
        num_bad = self.num_bad
        results = {
            "baseline": self.baseline_metrics,
            "gan": self.gan_metrics,
            "bad_images": num_bad,
            "class_names": list(self.class_names),
        }
        if self.info.is_main:
            with replace_atomically(self.out_dir / "metrics.json") as f:  # an OSError: the train command names it
                f.write(json.dumps(results, indent=2) + "\n")
            rows = {self.cfg.model.backbone: self.baseline_metrics}
            if self.gan_metrics is not None:
                rows["+ WGAN-gp"] = self.gan_metrics
            print(format_table(rows, title=f"{self.splits.val.name}: {len(self.splits.val)} images"), flush=True)
        return results
