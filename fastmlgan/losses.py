"""The losses of eqs. (1)–(5), as pure functions of (models, batch).

No data-dependent Python branching: the ablation switches are static (read once from the
config), so each function traces to one graph for ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastmlgan.kernels.gradient_penalty import gradient_penalty as _explicit_penalty
from fastmlgan.kernels.gradient_penalty import gradient_penalty_autograd as _textbook_penalty
from fastmlgan.kernels.gradient_penalty import unwrap_discriminator
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


@dataclass(frozen=True)
class LossSpec:
    """G's classification term (``--loss.*``): eq. (1)'s BCE, or the asymmetric loss of Ridnik et
    al. (ICCV 2021). Static and hashable, as ``GanSpec``."""

    kind: str = "bce"  # bce | asl
    gamma_neg: float = 4.0  # γ−, ASL's recommended value
    gamma_pos: float = 0.0  # γ+
    clip: float = 0.05  # m, the probability margin

    @classmethod
    def from_config(cls, loss) -> LossSpec:
        return cls(kind=loss.kind, gamma_neg=loss.gamma_neg, gamma_pos=loss.gamma_pos, clip=loss.clip)


def logistic_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. (1) with the sign the paper's notes restore: −E[Σ_i y_i log ỹ_i + (1−y_i) log(1−ỹ_i)].

    Summed over the |S| labels, averaged over the batch, computed from logits in fp32.
    """
    per_label = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_label.sum(dim=1).mean()


def asymmetric_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05
) -> torch.Tensor:
    """ASL (Ridnik et al., ICCV 2021, eqs. 4-5): with p = σ(z) and p_m = max(p − m, 0),

        L = −Σ_i [ y_i (1−p_i)^γ+ log p_i + (1−y_i) p_m,i^γ− log(1 − p_m,i) ],

    summed over the labels and averaged over the batch, as ``logistic_loss`` (the official code,
    Alibaba-MIIL/ASL src/loss_functions/losses.py, returns the sum over the batch too: a mean
    keeps the term's scale, hence α of eq. (2) against L_G and the learning rates, independent of
    the batch size and of how DDP splits it). The focusing weights are differentiated, as in the
    official ``AsymmetricLoss`` (its switch to detach them is commented out).

    Computed from logits in fp32, without the official code's clamp of p at 1e-8 (which caps a
    label's loss at 18.4 and zeroes its gradient beyond): log p = logsigmoid(z); −log(1−p) is
    z − logsigmoid(z), the expression of ``F.binary_cross_entropy_with_logits``, so γ− = γ+ = 0
    and m = 0 give eq. (1) bit for bit; log(1 − p_m) = min(0, log(σ(−z) + m)), through softplus; the
    weights are exp(γ·log(·)), so no power of 0 has an infinite derivative."""
    z, y = logits.float(), targets.float()
    log_p = F.logsigmoid(z)
    positive = -log_p
    if gamma_pos:
        positive = torch.exp(gamma_pos * F.logsigmoid(-z)) * positive  # (1 − p)^γ+
    if clip > 0:
        log_m = math.log(clip)  # log(σ(−z) + m) = log m + softplus(logsigmoid(−z) − log m)
        negative = -torch.clamp(log_m + F.softplus(F.logsigmoid(-z) - log_m), max=0.0)
        shifted = torch.sigmoid(z) - clip
        above = shifted > 0
        # p_m^γ− with 0^γ− where p <= m (0, or 1 when γ− = 0; the term is 0 there either way):
        # the power of a stand-in 1 keeps the masked branch's gradient finite.
        weight = torch.where(above, torch.where(above, shifted, 1.0) ** gamma_neg, 0.0**gamma_neg)
        negative = weight * negative
    else:
        negative = z - log_p
        if gamma_neg:
            negative = torch.exp(gamma_neg * log_p) * negative  # p^γ−
    per_label = y * positive + (1.0 - y) * negative
    return per_label.sum(dim=1).mean()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, loss: LossSpec) -> torch.Tensor:
    """L_logistic of eqs. (1)-(2), or ASL in its place (``--loss.kind asl``)."""
    if loss.kind == "asl":
        return asymmetric_loss(logits, targets, loss.gamma_neg, loss.gamma_pos, loss.clip)
    return logistic_loss(logits, targets)


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
    batch: dict[str, torch.Tensor | None],
    spec: GanSpec,
    penalty: PenaltyFn | None = None,
) -> dict[str, torch.Tensor]:
    """L_D of eq. (4) on three independently drawn batches (§4.1), from what G and f_ext made of
    them: a function of D alone, so phase 2 can run G and f_ext once for all its D updates.

    ``batch`` holds the real pairs ``matched_y, matched_z``; G's logits on the generated pairs'
    images ``generated_logits`` with those images' features ``generated_z`` and their true label
    sets ``generated_real_y`` (the other end of the penalty's interpolation, eq. 5); and with
    negative sampling ``mismatched_y`` (another training image's label set, different from the
    image's own) and ``mismatched_z``. The ``*_z`` are None for an unconditional D.

    The Gumbel-sigmoid sample ŷ is drawn here, per call, so every D update has its own noise.
    Only D's parameters receive gradients from the result. ``penalty`` defaults to the
    config's default, ``--gan.penalty explicit`` (eq. 5 first order,
    ``fastmlgan.kernels.gradient_penalty``).
    """
    penalty = penalty or _explicit_penalty
    with torch.no_grad():
        fake = sample_label_sets(batch["generated_logits"], spec)
    labels = [batch["matched_y"].float(), fake]
    features = [batch["matched_z"], batch["generated_z"]]
    if spec.negative_sampling:
        labels.append(batch["mismatched_y"].float())
        features.append(batch["mismatched_z"])
    z = torch.cat([f.float() for f in features]) if spec.conditional else None
    with _fp32(fake):
        # One D forward for all pair kinds (one DDP forward per backward); D runs in fp32
        # whatever the autocast dtype.
        scores = discriminator(torch.cat(labels), z)
        generated_z = batch["generated_z"].float() if spec.conditional else None
        gp = penalty(unwrap_discriminator(discriminator), batch["generated_real_y"].float(), fake, generated_z)
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
    batch: dict[str, torch.Tensor | None],
    spec: GanSpec,
    loss: LossSpec = LossSpec(),
) -> dict[str, torch.Tensor]:
    """L'_G = L_G + α·L_logistic (eqs. 2, 3) with L_G = −E[D(ŷ, x)], ŷ a Gumbel-sigmoid sample.

    ``batch`` holds the images ``x``, their label sets ``y`` and their features ``z`` = f_ext(x)
    (None for an unconditional D). ``loss``: the classification term (ASL in L_logistic's place
    with ``--loss.kind asl``; logged as ``bce`` either way)."""
    x, y, z = batch["x"], batch["y"], batch["z"]
    logits = generator(x)
    bce = classification_loss(logits, y, loss)
    fake = sample_label_sets(logits, spec)
    # D is not trained here: call it with detached parameters, so that not even a compiled
    # backward computes its weight gradients.
    d = unwrap_discriminator(discriminator)
    frozen = {name: p.detach() for name, p in d.named_parameters()}
    with _fp32(fake):
        features = z.float() if spec.conditional else None
        adversarial = -torch.func.functional_call(d, frozen, (fake, features)).mean()
    loss = adversarial + spec.bce_weight * bce
    return {"loss_g": loss, "bce": bce.detach(), "g_adversarial": adversarial.detach()}


def bce_loss(generator: nn.Module, batch: dict[str, torch.Tensor], loss: LossSpec = LossSpec()) -> dict[str, torch.Tensor]:
    """Phase 1 (§3.2): G trained as a plain multi-label classifier on L_logistic (or ASL)."""
    bce = classification_loss(generator(batch["x"]), batch["y"], loss)
    return {"loss_g": bce, "bce": bce.detach()}


# ----------------------------------------------------------------------------------------------
# The same losses from images, one D update at a time: the paper's procedure read literally (G and
# f_ext run inside each loss). The trainer computes G and f_ext once per phase-2 iteration instead;
# these are the reference its batched path is tested against, and what the golden record uses.


def image_features(feature_extractor: nn.Module | None, x: torch.Tensor, spec: GanSpec) -> torch.Tensor | None:
    """f_ext(x) in fp32 (no gradients), or None for an unconditional D."""
    if not spec.conditional:
        return None
    with torch.no_grad():
        return feature_extractor(x).float()


def discriminator_loss_from_images(
    discriminator: nn.Module,
    generator: nn.Module,
    feature_extractor: nn.Module | None,
    batch: dict[str, torch.Tensor],
    spec: GanSpec,
    penalty: PenaltyFn | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. (4) from ``matched_x/_y``, ``generated_x/generated_real_y`` and (with negative sampling)
    ``mismatched_x/_y``: G (no gradients) and f_ext run here, on this update's images."""
    with torch.no_grad():
        logits = generator(batch["generated_x"]).float()
    feats = {
        kind: image_features(feature_extractor, batch[f"{kind}_x"], spec)
        for kind in ("matched", "generated", "mismatched")
        if f"{kind}_x" in batch
    }
    d_batch = {
        "matched_y": batch["matched_y"],
        "matched_z": feats["matched"],
        "generated_logits": logits,
        "generated_real_y": batch["generated_real_y"],
        "generated_z": feats["generated"],
    }
    if spec.negative_sampling:
        d_batch["mismatched_y"] = batch["mismatched_y"]
        d_batch["mismatched_z"] = feats["mismatched"]
    return discriminator_loss(discriminator, d_batch, spec, penalty)


def generator_loss_from_images(
    discriminator: nn.Module,
    generator: nn.Module,
    feature_extractor: nn.Module | None,
    batch: dict[str, torch.Tensor],
    spec: GanSpec,
) -> dict[str, torch.Tensor]:
    """Eqs. (2)–(3) from ``x`` and ``y``, f_ext run here."""
    z = image_features(feature_extractor, batch["x"], spec)
    return generator_loss(discriminator, generator, {"x": batch["x"], "y": batch["y"], "z": z}, spec)


def _fp32(like: torch.Tensor):
    """D runs in fp32 whatever the autocast dtype: it is a few percent of the FLOPs, and its
    input gradient (the penalty, eq. 5) is a product of eight matrices that bf16 would round at
    every factor."""
    return torch.autocast(like.device.type, enabled=False)
