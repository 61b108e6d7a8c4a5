"""The training steps of §3: G, D and f_ext with their optimisers, and the updates that change them.

``TrainingSteps`` is the one component that touches the models while training. It builds G, D and
(when a conditional D needs it) f_ext from the config, wraps and compiles them once, and runs:

- ``bce_step(batch)``: phase 1 (§3.2), one Adam step of G on L_logistic;
- ``train_step(batch)``: one phase-2 iteration (§4.1), ``gan.d_steps`` D updates then one G
  update, all from one loader batch laid out by ``data.stream.IterationLayout``;
- ``discriminator_step(d_batch)`` and ``generator_step(g_batch)``: the single updates an
  iteration is made of.

The functions the steps run (the losses of ``fastmlgan.losses``, f_ext's and G's no-grad
forwards) are the public field ``functions``, a ``StepFunctions``: compiled or not once here, and
swappable (``bench/train.py`` swaps in ``StepFunctions.eager()`` to count one step's FLOPs).

Two extension points, one place each:

- ``model_input(batch)``: where a loader batch's images become the input of G and f_ext. Every
  training step goes through it (evaluation goes through ``scoring.inputs_to_device``).
- ``after_generator_step()``: called right after every optimiser step of G, in both phases.

The Trainer (``fastmlgan.train.trainer``) decides when each step runs; ``fastmlgan.train.state``
reads and writes what this component holds (``state_dict``/``load_state_dict``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastmlgan.config import Config
from fastmlgan.data.geometry import normalize_batch
from fastmlgan.data.stream import IterationLayout
from fastmlgan.data.types import LabeledImages
from fastmlgan.distributed import DistInfo, allreduce_gradients, broadcast_module
from fastmlgan.errors import ConfigError
from fastmlgan.kernels import gradient_penalty
from fastmlgan.losses import GanSpec, LossSpec, bce_loss, discriminator_loss, generator_loss, gradient_penalty_autograd
from fastmlgan.models import Discriminator, build_feature_extractor, build_generator
from fastmlgan.models.chunked_norm import batch_norm_chunks, make_chunkable
from fastmlgan.scoring import amp_dtype, inputs_to_device, to_device
from fastmlgan.train.ema import WeightEma
from fastmlgan.train.negatives import MismatchedLabelSampler

logger = logging.getLogger(__name__)


def extract_features(feature_extractor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f_ext(x) in fp32 (D's input precision)."""
    return feature_extractor(x).float()


def generator_logits(generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G's logits in fp32."""
    return generator(x).float()


def log_vector(out: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], torch.Tensor]:
    """A step's logged values as one fp32 vector, taken right after the step.

    One copy, so that reading them later needs one host sync for all keys, and so that a later
    CUDA-graph replay (``compile.mode=reduce-overhead`` reuses its output buffers) cannot
    overwrite them before they are logged."""
    keys = tuple(k for k in out if out[k].numel() == 1)
    return keys, torch.stack([out[k].detach().float().reshape(()) for k in keys])


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    """Images in channels_last (cuDNN's faster convolution layout): CUDA and an image backbone."""
    return cfg.model.channels_last and device.type == "cuda" and cfg.model.backbone != "mlp"


@dataclasses.dataclass
class StepFunctions:
    """The functions the steps call, each a function of (models, batch) with no hidden state.

    ``bce_loss(g, {"x", "y"})``, ``generator_loss(d, g, {"x", "y", "z"}, spec)`` and
    ``discriminator_loss(d, d_batch, spec, penalty)`` are ``fastmlgan.losses``';
    ``features(f_ext, x)`` and ``logits(g, x)`` are the no-grad forwards of phase 2. Each is one
    fullgraph ``torch.compile`` region when compiled (``compile``)."""

    bce_loss: Callable[..., dict[str, torch.Tensor]]
    generator_loss: Callable[..., dict[str, torch.Tensor]]
    discriminator_loss: Callable[..., dict[str, torch.Tensor]]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]

    @classmethod
    def eager(cls) -> StepFunctions:
        return cls(bce_loss, generator_loss, discriminator_loss, extract_features, generator_logits)

    def compile(self, **options) -> StepFunctions:
        """Each function wrapped in ``torch.compile(fn, **options)`` (compiled at its first call)."""
        return StepFunctions(**{f.name: torch.compile(getattr(self, f.name), **options) for f in dataclasses.fields(self)})


class TrainingSteps:
    """G, D and f_ext with their optimisers, the AMP scaler and the compile/DDP wrapping, and the
    G and D steps of both phases.

    Built by the Trainer (``Trainer(..., steps_class=...)`` takes a subclass, as the reproduction
    harness's control row does) after the global seed is set: G's and D's initial weights come
    from the global random stream, in this order."""

    def __init__(self, cfg: Config, info: DistInfo, layout: IterationLayout, train: LabeledImages, num_labels: int) -> None:
        """``layout``: phase 2's iteration layout; ``train``: the training split (its labels
        feed the mismatched-label sampler, its ``feature_dim`` an mlp backbone)."""
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.layout = layout
        self.spec = GanSpec.from_config(cfg.gan)
        self.loss_spec = LossSpec.from_config(cfg.loss)  # the classification term: BCE or ASL (--loss.kind)
        self.channels_last = uses_channels_last(cfg, self.device)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.mismatch_sampler = (
            MismatchedLabelSampler(train.labels, seed=cfg.train.seed * 7919 + info.rank)
            if cfg.gan.enable and cfg.gan.negative_sampling
            else None
        )

        in_dim = getattr(train, "feature_dim", None)  # feature-vector data (mlp backbone)
        self.generator = build_generator(
            cfg.model.backbone, num_labels, cfg.model.pretrained, width=cfg.model.width, depth=cfg.model.depth, in_dim=in_dim,
            image_size=None if in_dim else cfg.data.image_size,
        ).to(self.device)
        # Phase 2 runs G's no-grad forwards of all D updates as one batch, each update's images
        # normalised as their own BatchNorm batch (fastmlgan.models.chunked_norm).
        make_chunkable(self.generator)
        self.generator = self.generator.to(memory_format=self.memory_format)
        self.ema = WeightEma.create(cfg.train, self.generator)  # --train.ema_decay; D sees G's raw weights
        # §4.1: f_ext is the ImageNet-pretrained generator without its output layer, frozen. With
        # no pretrained weights it is G's trunk frozen at the end of the BCE phase instead. An
        # unconditional D (Table 3 (d)) never sees it, so then there is none.
        self.feature_extractor: nn.Module | None = None
        self.feature_source = ""
        # The frozen-feature cache (``fastmlgan.train.feature_cache``; anything with its ``lookup``
        # and ``stand_in_labels``): f_ext's features are read from it instead of computed.
        self.feature_cache = None
        if cfg.model.pretrained and self.spec.conditional and cfg.gan.enable:
            self.freeze_feature_extractor(f"pretrained:{cfg.model.pretrained}")
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
        self._wrap_and_compile()
        self.penalty = gradient_penalty if cfg.gan.penalty == "explicit" else gradient_penalty_autograd

        self.amp_dtype = amp_dtype(cfg.precision.amp, self.device)
        # fp16 gradients of G's activations underflow without loss scaling; bf16 needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _wrap_and_compile(self) -> None:
        """Wrapping and compilation happen once, here; state dicts always come from the plain modules.

        - one process: each step (BCE, G, the whole D step with its penalty, f_ext's and G's
          no-grad forwards) is one fullgraph torch.compile region.
        - several processes, eager: G and D in DDP (all-reduce overlapped with backward).
        - several processes, compiled: G is compiled as a module and wrapped in DDP (torch's
          recommended order): DDPOptimizer splits G's graph at DDP's gradient buckets, so each
          bucket's all-reduce starts while the rest of the backward runs. The loss around G (a
          few small ops) stays eager: dynamo cannot trace DDP's forward inside a fullgraph region
          ("Unsupported method call Logger.set_runtime_stats_and_log", torch 2.14). D's step
          stays one compiled region on the plain module, its gradients averaged after backward
          in flat buckets (allreduce_gradients): D is ~2M parameters and ~1% of an iteration's
          time, so there is nothing to overlap."""
        cfg, info = self.cfg, self.info
        self.compiled = cfg.compile.enable
        eager = StepFunctions.eager()
        self.functions = eager.compile(fullgraph=True, mode=cfg.compile.mode) if self.compiled else eager
        # What the steps run G and D through: the plain modules, or their DDP wrappers.
        self.g_model: nn.Module = self.generator
        self.d_model: nn.Module = self.discriminator
        self.allreduce_after_backward: set[nn.Module] = set()
        if not info.enabled:
            return
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = {"device_ids": ids, "bucket_cap_mb": cfg.dist.bucket_cap_mb}
        if self.compiled:
            if cfg.dist.bucket_cap_mb < 1:
                raise ConfigError(
                    f"--dist.bucket_cap_mb {cfg.dist.bucket_cap_mb} with --compile.enable under torchrun: DDP's "
                    "first bucket is 1 MB and torch.compile's DDPOptimizer needs the others at least as large; use >= 1"
                )
            self.generator.compile(mode=cfg.compile.mode)
            self.functions = dataclasses.replace(
                self.functions, bce_loss=eager.bce_loss, generator_loss=eager.generator_loss, logits=eager.logits
            )
            broadcast_module(self.discriminator)
            self.allreduce_after_backward.add(self.discriminator)
        else:
            self.d_model = DDP(self.discriminator, **ddp)
        self.g_model = DDP(self.generator, **ddp)

    def describe(self) -> str:
        """One line: the models, the device, the precision and the compile mode."""
        cfg = self.cfg
        return (
            f"G: {cfg.model.backbone} ({sum(p.numel() for p in self.generator.parameters())} params, "
            f"pretrained={cfg.model.pretrained or None!r}), D: {sum(p.numel() for p in self.discriminator.parameters())} "
            f"params, device {self.device}, world size {self.info.world_size}, amp {self.amp_dtype}, "
            f"compile {cfg.compile.mode if cfg.compile.enable else 'off'}"
        )

    # ------------------------------------------------------------------------------------------
    # set-up

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sync_batchnorm_statistics(self) -> None:
        """Give every rank rank 0's BatchNorm running statistics. DDP copies them into each rank
        before a forward, after which each rank updates them from its own batch: without this,
        ranks would evaluate (and freeze f_ext) with slightly different models."""
        if self.info.enabled:
            broadcast_module(self.generator, buffers_only=True)

    def freeze_feature_extractor(self, source: str) -> None:
        """f_ext from G as it is now (``source`` names where its weights came from)."""
        self.sync_batchnorm_statistics()
        self.feature_extractor = build_feature_extractor(self.generator, source).to(self.device)
        self.feature_source = source
        if self.info.is_main:
            logger.info("f_ext frozen from %s", source)

    def start_gan_phase(self) -> None:
        """f_ext frozen from G when none was loaded (conditional D only), and G's phase-2 learning rate."""
        if self.spec.conditional and self.feature_extractor is None:
            self.freeze_feature_extractor("phase1")
        for group in self.opt_g.param_groups:
            group["lr"] = self.cfg.optim.g_lr

    # ------------------------------------------------------------------------------------------
    # extension points

    def model_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A loader batch's images as G's and f_ext's input: on the device, in the models' memory
        format (feature vectors as they are). The one place a training batch's images become the
        model's input: uint8 batches (the cache loader's ``output="uint8"``, issue 20) are
        normalised here, on the device, by the compiled normaliser when the steps are compiled."""
        return inputs_to_device(batch, self.device, self.memory_format, normalize=self.normalize_images)

    @functools.cached_property
    def normalize_images(self):
        """``geometry.normalize_batch``, compiled with the steps (one fused kernel) when they are."""
        return torch.compile(normalize_batch, fullgraph=True, dynamic=False) if self.compiled else normalize_batch

    def after_generator_step(self) -> None:
        """Called right after every optimiser step of G (phase 1's ``bce_step`` and phase 2's
        ``generator_step``), once per G update, outside any compiled region. Nothing by default:
        the place for what follows G's weights: the weight average (``--train.ema_decay``)."""
        if self.ema is not None:
            self.ema.update(self.generator)

    # ------------------------------------------------------------------------------------------
    # the steps: each a function of (models, batch) followed by its optimizer update

    def bce_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Phase 1 (§3.2): one Adam step of G on L_logistic."""
        self.mark_step()
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            x = self.model_input(batch)
            out = self.functions.bce_loss(self.g_model, {"x": x, "y": to_device(batch["labels"], self.device)}, self.loss_spec)
        self.scaler.scale(out["loss_g"]).backward()
        self._step_generator()
        return out

    def discriminator_step(self, d_batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """One D update on eq. (4) from what G and f_ext made of its three batches (matched,
        generated, mismatched pairs; see ``losses.discriminator_loss``). D runs in fp32."""
        self.opt_d.zero_grad(set_to_none=True)
        out = self.functions.discriminator_loss(self.d_model, d_batch, self.spec, self.penalty)
        out["loss_d"].backward()
        self._sync_gradients(self.discriminator)
        self.opt_d.step()
        return out

    def generator_step(self, g_batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """One G update on eqs. (2)–(3) from images ``x``, labels ``y`` and features ``z``.
        Only G's parameters receive gradients."""
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.functions.generator_loss(self.discriminator, self.g_model, g_batch, self.spec, self.loss_spec)
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
            parts = [self.functions.features(self.feature_extractor, x) for x in torch.split(images, size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def generated_logits(self, images: torch.Tensor) -> torch.Tensor:
        """G's logits (fp32, no gradients) on the generated pairs of all D updates in one forward;
        each update's B images are their own BatchNorm batch, as in separate forwards."""
        with self.autocast(), batch_norm_chunks(self.generator, self.layout.d_steps):
            return self.functions.logits(self.generator, images)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One phase-2 iteration (§4.1) from one loader batch laid out by ``IterationLayout``:
        ``gan.d_steps`` D updates, then one G update.

        f_ext runs once on all of the iteration's images and G once (no gradients) on all the
        generated pairs' images; then each D update runs D alone, with its own Gumbel noise,
        interpolation ε and mismatched label sets, in the order of separate updates."""
        lay = self.layout
        self.mark_step()
        images = self.model_input(batch)
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
            d_log = log_vector(self.discriminator_step(d_batch))
        g = lay.generator_rows()
        g_out = self.generator_step({"x": images[g], "y": labels[g], "z": rows(z, g)})
        g_keys, g_values = log_vector(g_out)
        return {**dict(zip(d_log[0], d_log[1])), **dict(zip(g_keys, g_values))}

    def _step_generator(self) -> None:
        self._sync_gradients(self.generator)
        self.scaler.step(self.opt_g)
        self.scaler.update()
        self.after_generator_step()

    def mark_step(self) -> None:
        """Mark where a new iteration starts, for CUDA graphs (compile.mode=reduce-overhead):
        they reuse their output buffers. Within an iteration, later graphs read earlier graphs'
        outputs (f_ext's features, G's logits), so the mark is once per iteration, not per graph."""
        if self.compiled and self.cfg.compile.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _sync_gradients(self, module: nn.Module) -> None:
        """Average the gradients of a module that is not in DDP (D in compiled multi-process runs)."""
        if module in self.allreduce_after_backward:
            allreduce_gradients(module.parameters(), self.info.world_size)

    # ------------------------------------------------------------------------------------------
    # state (the checkpoint's keys of this component; ``fastmlgan.train.state`` composes the file)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "feature_extractor": None if self.feature_extractor is None else self.feature_extractor.state_dict(),
            "feature_extractor_source": self.feature_source,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "mismatch_sampler": None if self.mismatch_sampler is None else self.mismatch_sampler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What a resumed checkpoint holds of this component, but for the random streams and the
        AMP scaler (``fastmlgan.train.state`` restores those after the global random state)."""
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if state["feature_extractor"] is not None:
            self.freeze_feature_extractor(state["feature_extractor_source"])
            self.feature_extractor.load_state_dict(state["feature_extractor"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.mismatch_sampler is not None and state.get("mismatch_sampler"):
            self.mismatch_sampler.load_state_dict(state["mismatch_sampler"])

    def load_baseline(self, state: dict[str, Any]) -> None:
        """G, its optimizer and (for a conditional D) f_ext of a finished phase 1; D stays fresh."""
        self.generator.load_state_dict(state["generator"])
        # Adam keeps the tensors it is given and updates them in place: copy them, so that one
        # baseline state can start any number of phase-2 runs.
        self.opt_g.load_state_dict(copy.deepcopy(state["opt_g"]))
        if state["feature_extractor"] is not None and self.spec.conditional:
            self.freeze_feature_extractor(state["feature_extractor_source"])
            self.feature_extractor.load_state_dict(state["feature_extractor"])
