"""The Trainer: the G and D steps of §3, the two-phase schedule of §3.2/§4.1, evaluation and
checkpoints. Launched by ``fastmlgan.train`` under ``python`` or ``torchrun``."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastmlgan import checkpoint as ckpt
from fastmlgan.config import Config
from fastmlgan.distributed import (
    DistInfo,
    all_gather_arrays,
    allreduce_gradients,
    barrier,
    broadcast_module,
    broadcast_object,
)
from fastmlgan.errors import FastMLGANError
from fastmlgan.kernels import gradient_penalty
from fastmlgan.losses import GanSpec, bce_loss, discriminator_loss, generator_loss, gradient_penalty_autograd
from fastmlgan.metrics import compute_metrics, format_table
from fastmlgan.models import Discriminator, build_feature_extractor, build_generator
from fastmlgan.progress import Progress

logger = logging.getLogger(__name__)

PHASES = ("bce", "gan", "done")


class BatchStream:
    """An endless stream of training batches across data epochs, on the device.

    Three independently drawn batches per D update (§4.1) are simply three consecutive batches
    of the shuffled stream. Counts the share of wall time spent waiting for data and the images
    the loader substituted because they could not be decoded.
    """

    def __init__(self, loader, device: torch.device, data_epoch: int = 0) -> None:
        from fastmlgan.loaders.torch_loader import set_epoch

        self.loader = loader
        self.device = device
        self.data_epoch = data_epoch
        self._set_epoch = set_epoch
        self._it: Iterator | None = None
        self.wait_s = 0.0
        self.num_bad = 0

    def __len__(self) -> int:
        return len(self.loader)

    def next(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        while True:
            if self._it is None:
                self._set_epoch(self.loader, self.data_epoch)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None
                self.data_epoch += 1
        if "bad" in batch:
            self.num_bad += int(batch["bad"].sum())
        self.wait_s += time.perf_counter() - t0
        return batch


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision.amp`` on ``device`` (None: no autocast)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def _inputs_to_device(batch: dict[str, torch.Tensor], device: torch.device, memory_format) -> torch.Tensor:
    """G's input on the device: images in the model's memory format, feature vectors as they are."""
    x = _to_device(batch["image"], device)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


@torch.no_grad()
def predict(
    generator: nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[np.ndarray, np.ndarray]:
    """σ(G(x)) and the targets of every image ``loader`` yields, G in eval mode (this process only)."""
    generator.eval()
    scores, targets = [], []
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for batch in loader:
        x = _inputs_to_device(batch, device, memory_format)
        with autocast:
            logits = generator(x)
        # An undecodable image has a stand-in in its slot (the loaders' skip policy); leave it out
        # so that no image is counted twice.
        keep = ~batch["bad"].cpu().numpy() if "bad" in batch else slice(None)
        scores.append(torch.sigmoid(logits.float()).cpu().numpy()[keep])
        targets.append(batch["labels"].cpu().numpy()[keep])
    num_labels = generator.num_labels
    s = np.concatenate(scores) if scores else np.zeros((0, num_labels), np.float32)
    t = np.concatenate(targets) if targets else np.zeros((0, num_labels), np.float32)
    return s, t


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, out_dir: Path, splits=None) -> None:
        """``splits``: pre-built ``Splits`` (the reproduction harness passes its own); read from
        ``cfg.data`` when None."""
        from fastmlgan.loaders.negatives import MismatchedLabelSampler
        from fastmlgan.loaders.registry import build_loaders, build_splits

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
        self.train_loader, self.eval_loader = build_loaders(
            cfg.data, self.splits, info, cfg.train.seed, channels_last=channels_last
        )
        self.mismatch_sampler = (
            MismatchedLabelSampler(self.splits.train.labels, seed=cfg.train.seed * 7919 + info.rank)
            if cfg.gan.enable and cfg.gan.negative_sampling
            else None
        )

        in_dim = getattr(self.splits.train, "feature_dim", None)  # feature-vector data (mlp backbone)
        self.generator = build_generator(
            cfg.model.backbone, num_labels, cfg.model.pretrained, width=cfg.model.width, depth=cfg.model.depth, in_dim=in_dim
        ).to(self.device)
        self.generator = self.generator.to(memory_format=self.memory_format)
        # §4.1: f_ext is the ImageNet-pretrained generator without its output layer, frozen. With
        # no pretrained weights it is G's trunk frozen at the end of the BCE phase instead.
        self.feature_extractor = None
        self.feature_source = ""
        if cfg.model.pretrained:
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

        betas = (cfg.optim.beta1, cfg.optim.beta2)
        self.opt_g = torch.optim.Adam(
            self.generator.parameters(), lr=cfg.optim.bce_lr, betas=betas, weight_decay=cfg.optim.weight_decay
        )
        self.opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=cfg.optim.d_lr, betas=betas, weight_decay=cfg.optim.weight_decay
        )
        # Wrapping and compilation happen once, here; state dicts always come from the plain modules.
        #  - eager: G and D are wrapped in DDP (gradient all-reduce overlapped with backward).
        #  - compiled: each step (BCE, G, the whole D step with its penalty) is one fullgraph
        #    torch.compile region. Dynamo cannot trace DDP's forward inside a fullgraph region
        #    ("Unsupported method call Logger.set_runtime_stats_and_log", torch 2.14), so the steps
        #    take the plain modules and gradients are averaged after backward in a few flat
        #    buckets (allreduce_gradients). A compiled backward hands its gradients over only at
        #    its end, so DDP could not overlap them with the backward anyway.
        self.g_model: nn.Module = self.generator
        self.d_model: nn.Module = self.discriminator
        self.compiled = cfg.compile.enable
        if info.enabled and not self.compiled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_model = DDP(self.generator, device_ids=ids)
            self.d_model = DDP(self.discriminator, device_ids=ids)
        if info.enabled and self.compiled:
            broadcast_module(self.generator)
            broadcast_module(self.discriminator)
        self.penalty = gradient_penalty if cfg.gan.penalty == "explicit" else gradient_penalty_autograd
        self._bce_loss, self._d_loss, self._g_loss = bce_loss, discriminator_loss, generator_loss
        if self.compiled:
            options = {"fullgraph": True, "mode": cfg.compile.mode}
            self._bce_loss = torch.compile(bce_loss, **options)
            self._d_loss = torch.compile(discriminator_loss, **options)
            self._g_loss = torch.compile(generator_loss, **options)

        self.amp_dtype = amp_dtype(cfg.precision.amp, self.device)
        # fp16 gradients of G's activations underflow without loss scaling; bf16 needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        torch.manual_seed(cfg.train.seed * 1000003 + info.rank)  # per-rank noise streams
        self.phase = "bce"
        self.epoch = 0  # completed epochs of the current phase
        self.global_step = 0
        self.data_epoch = 0
        self.baseline_metrics: dict | None = None
        self.gan_metrics: dict | None = None
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
                cfg.compile.enable,
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
        return _inputs_to_device(batch, self.device, self.memory_format)

    # ------------------------------------------------------------------------------------------
    # the steps: each a function of (models, batch) followed by its optimizer update

    def bce_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Phase 1 (§3.2): one Adam step of G on L_logistic."""
        self._mark_step()
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            out = self._bce_loss(self.g_model, {"x": self._images(batch), "y": _to_device(batch["labels"], self.device)})
        self.scaler.scale(out["loss_g"]).backward()
        self._step_generator()
        return out

    def discriminator_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One D update on eq. (4) from three independently drawn batches (matched, generated,
        mismatched; two without negative sampling)."""
        d_batch = {
            "matched_x": self._images(batches[0]),
            "matched_y": _to_device(batches[0]["labels"], self.device),
            "generated_x": self._images(batches[1]),
            "generated_y": _to_device(batches[1]["labels"], self.device),
        }
        if self.spec.negative_sampling:
            d_batch["mismatched_x"] = self._images(batches[2])
            mismatched = self.mismatch_sampler.sample(batches[2]["labels"])
            if self.device.type == "cuda":
                mismatched = mismatched.pin_memory()  # a pageable copy would block the host
            d_batch["mismatched_y"] = _to_device(mismatched, self.device)
        self._mark_step()
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            out = self._d_loss(
                self.d_model, self.generator, self.feature_extractor, d_batch, self.spec, self.penalty
            )
        out["loss_d"].backward()
        self._sync_gradients(self.discriminator)
        self.opt_d.step()
        return out

    def generator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One G update on eqs. (2)–(3). Only G's parameters receive gradients."""
        self._mark_step()
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            out = self._g_loss(
                self.discriminator,
                self.g_model,
                self.feature_extractor,
                {"x": self._images(batch), "y": _to_device(batch["labels"], self.device)},
                self.spec,
            )
        self.scaler.scale(out["loss_g"]).backward(inputs=list(self.generator.parameters()))
        self._step_generator()
        return out

    def train_step(self, stream: BatchStream) -> dict[str, torch.Tensor]:
        """One phase-2 iteration (§4.1): ``gan.d_steps`` D updates, then one G update."""
        kinds = 3 if self.spec.negative_sampling else 2
        d_out: dict[str, torch.Tensor] = {}
        for _ in range(self.cfg.gan.d_steps):
            d_out = self.discriminator_step([stream.next() for _ in range(kinds)])
        g_out = self.generator_step(stream.next())
        return {**d_out, **g_out}

    def _step_generator(self) -> None:
        self._sync_gradients(self.generator)
        self.scaler.step(self.opt_g)
        self.scaler.update()

    def _mark_step(self) -> None:
        # CUDA graphs (compile.mode=reduce-overhead) reuse their output buffers: tell them where a
        # new iteration starts.
        if self.compiled and self.cfg.compile.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _sync_gradients(self, module: nn.Module) -> None:
        """Compiled multi-process runs average gradients here (eager runs: DDP already did)."""
        if self.compiled and self.info.enabled:
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
        """The metrics of ``fastmlgan.metrics`` on the evaluation split (§4.1: whole image, one crop)."""
        scores, targets = self.predict()
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
        # The data stream restarts at a fresh shuffled epoch after the last completed one.
        self.data_epoch = state["data_epoch"] + 1
        self.baseline_metrics = state["baseline_metrics"]
        self.gan_metrics = state["gan_metrics"]
        if self.phase == "done" and self.cfg.gan.enable and self.epoch < self.cfg.train.gan_epochs:
            # A finished run resumed with more GAN epochs (or with the GAN newly enabled): reopen
            # phase 2. ``epoch`` counts completed GAN epochs (0 after a BCE-only run).
            self.phase, self.gan_metrics = "gan", None
        ckpt.set_rng_state(state["rng"])
        if self.info.rank:
            # The checkpoint holds rank 0's streams: give the other ranks their own again.
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
        if state["feature_extractor"] is not None:
            self._freeze_feature_extractor(state["feature_extractor_source"])
            self.feature_extractor.load_state_dict(state["feature_extractor"])
        self.baseline_metrics = state["baseline_metrics"]
        self.global_step = state["global_step"]
        self.data_epoch = state["data_epoch"] + 1
        self.phase, self.epoch, self.gan_metrics = ("gan" if self.cfg.gan.enable else "done"), 0, None

    def save_checkpoint(self, name: str = ckpt.LAST) -> None:
        if not self.cfg.checkpoint.enable:
            return
        self._sync_batchnorm_statistics()  # the saved G is the one every rank evaluates
        if self.info.is_main:
            ckpt.save_atomic(self.state_dict(), self.out_dir / ckpt.CHECKPOINT_DIR / name)
        barrier()

    # ------------------------------------------------------------------------------------------
    # the schedule

    def _log_metrics(self, record: dict[str, Any], epoch_start: float | None = None, images_per_step: int = 0) -> None:
        if self.info.is_main:
            if getattr(self, "run_log", None) is None:  # fastmlgan.train attaches one (TensorBoard, train.log)
                from fastmlgan.runlog import RunLog

                self.run_log = RunLog(self.out_dir)
            self.run_log.write(record, epoch_start, images_per_step)

    def _check_finite(self, values: dict[str, float]) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if self.info.enabled:
            # Every rank must stop together, or the others would wait in the next collective.
            flag = torch.tensor([0.0 if bad else 1.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            if flag.item() == 0.0 and not bad:
                bad = {"on another rank": float("nan")}
        if bad:
            raise FastMLGANError(
                f"non-finite loss at step {self.global_step} ({bad}); lower --optim.g_lr/--optim.d_lr "
                "or try --precision.amp none. The last good checkpoint is in "
                f"{self.out_dir / ckpt.CHECKPOINT_DIR}"
            )

    def _log_step(self, phase: str, out: dict[str, torch.Tensor], stream: BatchStream, t_start: float) -> str:
        values = {k: float(v.detach()) for k, v in out.items()}  # the only host sync of the loop
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
        batches = 1 if phase == "bce" else self.cfg.gan.d_steps * (3 if self.spec.negative_sampling else 2) + 1
        self._log_metrics(record, t_start, batches * self.cfg.data.batch_size)  # adds img/s (global)
        keys = ("bce", "loss_d", "wasserstein", "gp")
        return " ".join(f"{k}={values[k]:.3f}" for k in keys if k in values)

    def _epoch_batches(self, stream: BatchStream) -> int:
        n = len(stream)
        cap = self.cfg.train.max_steps_per_epoch
        return min(n, cap) if cap else n

    def _run_epoch(self, stream: BatchStream) -> None:
        phase = self.phase
        n_batches = self._epoch_batches(stream)
        if phase == "bce":
            total = n_batches
            desc = f"bce {self.epoch + 1}/{self.cfg.train.bce_epochs}"
        else:
            per_step = self.cfg.gan.d_steps * (3 if self.spec.negative_sampling else 2) + 1
            total = max(1, n_batches // per_step)
            desc = f"gan {self.epoch + 1}/{self.cfg.train.gan_epochs}"
        progress = Progress(total, desc, enabled=self.info.is_main)
        stream.wait_s = 0.0
        t_start = time.perf_counter()
        for i in range(total):
            out = self.bce_step(stream.next()) if phase == "bce" else self.train_step(stream)
            self.global_step += 1
            postfix = None
            if (i + 1) % self.cfg.train.log_every == 0 or i + 1 == total:
                postfix = self._log_step(phase, out, stream, t_start)
            progress.update(1, postfix)
        progress.close()
        self.data_epoch = stream.data_epoch
        self.epoch += 1
        last = self.epoch == (self.cfg.train.bce_epochs if phase == "bce" else self.cfg.train.gan_epochs)
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
        """Phase 1 (BCE) then phase 2 (WGAN-GP); resumable at any epoch boundary."""
        stream = BatchStream(self.train_loader, self.device, self.data_epoch)
        self.generator.train()
        self.discriminator.train()
        if self.phase == "bce":
            while self.epoch < self.cfg.train.bce_epochs:
                self._run_epoch(stream)
                self.save_checkpoint()
            if self.baseline_metrics is None:  # bce_epochs = 0: the (pretrained) starting point
                self.baseline_metrics = self.evaluate()
            self.phase, self.epoch = ("gan" if self.cfg.gan.enable else "done"), 0
            self.save_checkpoint()
            self.save_checkpoint("baseline.pt")
        if self.phase == "gan":
            if self.feature_extractor is None:
                self._freeze_feature_extractor("phase1")
            for group in self.opt_g.param_groups:
                group["lr"] = self.cfg.optim.g_lr
            while self.epoch < self.cfg.train.gan_epochs:
                self._run_epoch(stream)
                self.save_checkpoint()
            if self.gan_metrics is None:
                self.gan_metrics = self.evaluate()
            self.phase = "done"
            self.save_checkpoint()
        results = {
            "baseline": self.baseline_metrics,
            "gan": self.gan_metrics,
            "bad_images": stream.num_bad,
            "class_names": list(self.class_names),
        }
        if self.info.is_main:
            (self.out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            rows = {self.cfg.model.backbone: self.baseline_metrics}
            if self.gan_metrics is not None:
                rows["+ WGAN-gp"] = self.gan_metrics
            print(format_table(rows, title=f"{self.splits.val.name}: {len(self.splits.val)} images"), flush=True)
        return results

