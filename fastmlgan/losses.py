"""The losses of eqs. (1)–(5), as pure functions of (models, batch).

No data-dependent Python branching: the ablation switches are static (read once from the
config), so each function traces to one graph for ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastmlgan.kernels.gradient_penalty import gradient_penalty_autograd as _textbook_penalty
from fastmlgan.kernels.gumbel_sigmoid import gumbel_sigmoid


@dataclass(frozen=True)
class GanSpec:
    """The static part of the GAN config the losses need (hashable, so compile guards are cheap)."""

    bce_weight: float = 10.0  # α, eq. (2)
    gp_weight: float = 10.0  # λ, eq. (4)
    inv_temperature: float = 0.9  # β of the Gumbel sigmoid, §4.1
    negative_sampling: bool = True  # eq. (4) third term; Table 3 (c) when False
    conditional: bool = True  # Table 3 (d) when False
    gumbel: bool = True  # Table 3 (e) when False
    hard_samples: bool = False

    @property
    def generated_weight(self) -> float:
        # eq. (4): ½ with negative sampling; "the weight of the second term becomes 1" without (§4.2.3).
        return 0.5 if self.negative_sampling else 1.0

    @property
    def mismatched_weight(self) -> float:
        return 0.5 if self.negative_sampling else 0.0

    @classmethod
    def from_config(cls, gan) -> GanSpec:
        return cls(
            bce_weight=gan.bce_weight,
            gp_weight=gan.gp_weight,
            inv_temperature=gan.inv_temperature,
            negative_sampling=gan.negative_sampling,
            conditional=gan.conditional,
            gumbel=gan.gumbel,
            hard_samples=gan.hard_samples,
        )


def logistic_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. (1) with the sign the paper's notes restore: −E[Σ_i y_i log ỹ_i + (1−y_i) log(1−ỹ_i)].

    Summed over the |S| labels, averaged over the batch, computed from logits in fp32.
    """
    per_label = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_label.sum(dim=1).mean()


def sample_label_sets(logits: torch.Tensor, spec: GanSpec) -> torch.Tensor:
    """ŷ ~ G(x) (§3.2): a Gumbel-sigmoid sample, or σ(ℓ) itself for ablation (e)."""
    if spec.gumbel:
        return gumbel_sigmoid(logits, spec.inv_temperature, hard=spec.hard_samples)
    return torch.sigmoid(logits.float())


def gradient_penalty_autograd(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    features: torch.Tensor | None,
    epsilon: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. (5), the textbook way (Gulrajani et al.): double backward through D.

    y* = εy + (1−ε)ŷ with ε ~ U(0,1) per sample (drawn here unless given), the gradient taken
    w.r.t. the label input only, the image features held fixed. Returns
    E[(‖∇_{y*} D(y*, z)‖₂ − 1)²] without λ. ``--gan.penalty autograd``; the default computes the
    same value first-order (``fastmlgan.kernels.gradient_penalty``).
    """
    if epsilon is None:
        epsilon = torch.rand(real.shape[0], device=real.device, dtype=torch.float32)
    return _textbook_penalty(discriminator, real, fake, features, epsilon)


PenaltyFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def discriminator_loss(
    discriminator: nn.Module,
    generator: nn.Module,
    feature_extractor: nn.Module,
    batch: dict[str, torch.Tensor],
    spec: GanSpec,
    penalty: PenaltyFn = gradient_penalty_autograd,
) -> dict[str, torch.Tensor]:
    """L_D of eq. (4) on three independently drawn batches (§4.1).

    ``batch`` holds ``matched_x, matched_y`` (real pairs), ``generated_x, generated_y`` (G labels
    these images; ``generated_y`` are their true labels, the other end of the penalty's
    interpolation), and with negative sampling ``mismatched_x, mismatched_y`` (``mismatched_y``
    is another training image's label set, different from the image's own).

    G runs without gradients; only D's parameters receive gradients from the result.
    """
    with torch.no_grad():
        fake = sample_label_sets(generator(batch["generated_x"]), spec)
        images = [batch["matched_x"], batch["generated_x"]]
        if spec.negative_sampling:
            images.append(batch["mismatched_x"])
        if spec.conditional:
            # One f_ext call for all pair kinds; D runs in fp32 whatever the autocast dtype.
            z = feature_extractor(torch.cat(images)).float()
            z_parts = list(torch.split(z, [x.shape[0] for x in images]))
        else:
            z, z_parts = None, [None] * len(images)
    labels = [batch["matched_y"].float(), fake]
    if spec.negative_sampling:
        labels.append(batch["mismatched_y"].float())
    with _fp32(fake):
        # One D forward for all pair kinds (one DDP forward per backward).
        scores = discriminator(torch.cat(labels), z)
        gp = penalty(_unwrap(discriminator), batch["generated_y"].float(), fake, z_parts[1])
    parts = torch.split(scores, [y.shape[0] for y in labels])
    matched = parts[0].mean()
    generated = parts[1].mean()
    loss = -matched + spec.generated_weight * generated
    out = {"d_matched": matched.detach(), "d_generated": generated.detach()}
    if spec.negative_sampling:
        mismatched = parts[2].mean()
        loss = loss + spec.mismatched_weight * mismatched
        out["d_mismatched"] = mismatched.detach()
    loss = loss + spec.gp_weight * gp
    out["gp"] = gp.detach()
    # The critic's estimate of the Wasserstein distance between real and generated pairs.
    out["wasserstein"] = (matched - generated).detach()
    out["loss_d"] = loss
    return out


def generator_loss(
    discriminator: nn.Module,
    generator: nn.Module,
    feature_extractor: nn.Module,
    batch: dict[str, torch.Tensor],
    spec: GanSpec,
) -> dict[str, torch.Tensor]:
    """L'_G = L_G + α·L_logistic (eqs. 2, 3) with L_G = −E[D(ŷ, x)], ŷ a Gumbel-sigmoid sample."""
    x, y = batch["x"], batch["y"]
    logits = generator(x)
    bce = logistic_loss(logits, y)
    fake = sample_label_sets(logits, spec)
    z = feature_extractor(x).float() if spec.conditional else None
    # D is not trained here: call it with detached parameters, so that not even a compiled
    # backward computes its weight gradients.
    d = _unwrap(discriminator)
    frozen = {name: p.detach() for name, p in d.named_parameters()}
    with _fp32(fake):
        adversarial = -torch.func.functional_call(d, frozen, (fake, z)).mean()
    loss = adversarial + spec.bce_weight * bce
    return {"loss_g": loss, "bce": bce.detach(), "g_adversarial": adversarial.detach()}


def bce_loss(generator: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Phase 1 (§3.2): G trained as a plain multi-label classifier on L_logistic."""
    bce = logistic_loss(generator(batch["x"]), batch["y"])
    return {"loss_g": bce, "bce": bce.detach()}


def _fp32(like: torch.Tensor):
    """D runs in fp32 whatever the autocast dtype: it is a few percent of the FLOPs, and the
    penalty's gradient of a gradient loses too much in bf16."""
    return torch.autocast(like.device.type, enabled=False)


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers.

    The G step calls D unwrapped: D is not being trained there, and calling its DDP wrapper would
    prepare an all-reduce of gradients nobody uses.
    """
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module
