"""What the critic did in a GAN row: its logged losses over phase 2, its scores on real, relaxed,
thresholded and mismatched label sets at the end, and how much of G's update it contributes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fastmlgan.losses import logistic_loss, sample_label_sets
from fastmlgan.scoring import inputs_to_device

D_LOG_KEYS = ("loss_d", "wasserstein", "gp", "d_matched", "d_generated", "d_mismatched", "g_adversarial", "bce")


@torch.no_grad()
def discriminator_diagnostics(trainer) -> dict[str, float]:
    """Mean critic scores on the validation split at the end of phase 2: real label sets, G's
    relaxed samples (what D is trained on), the same samples thresholded at 0.5, and another
    image's real label set (the batch rolled by one). ``softness_gap`` = D(hard) − D(relaxed) is
    how much D rewards a sample only for being binary; ``dependency_gap`` = D(real) − D(hard) what
    is left for the label sets themselves. ``sample_softness``: mean min(ŷ, 1 − ŷ) of the samples."""
    steps = trainer.steps
    generator, discriminator, f_ext = steps.generator, steps.discriminator, steps.feature_extractor
    generator.eval()
    sums = {"real": 0.0, "generated": 0.0, "generated_hard": 0.0, "mismatched": 0.0, "sample_softness": 0.0}
    count = 0
    for batch in trainer.eval_loader:
        x = inputs_to_device(batch, trainer.device, steps.memory_format)
        y = batch["labels"].to(trainer.device).float()
        fake = sample_label_sets(generator(x).float(), steps.spec)
        z = f_ext(x).float() if steps.spec.conditional else None
        for name, labels in (
            ("real", y),
            ("generated", fake),
            ("generated_hard", (fake > 0.5).float()),
            ("mismatched", y.roll(1, dims=0)),
        ):
            sums[name] += float(discriminator(labels, z).sum())
        sums["sample_softness"] += float(torch.minimum(fake, 1.0 - fake).mean(dim=1).sum())
        count += len(y)
    generator.train()
    out = {f"D_{k}" if k != "sample_softness" else k: v / max(count, 1) for k, v in sums.items()}
    out["softness_gap"] = out["D_generated_hard"] - out["D_generated"]
    out["dependency_gap"] = out["D_real"] - out["D_generated_hard"]
    with torch.enable_grad():
        out.update(gradient_share(trainer))
    return out


def gradient_share(trainer, num_batches: int = 4) -> dict[str, float]:
    """How much of G's phase-2 update D contributes (eq. 2): the ratio of the norms of ∇θ L_G and
    ∇θ α·L_logistic over G's parameters, and their cosine, on the first ``num_batches`` training
    batches at the end of phase 2 (G in eval mode, so BatchNorm statistics stay untouched)."""
    steps = trainer.steps
    generator, discriminator, f_ext = steps.generator, steps.discriminator, steps.feature_extractor
    params = [p for p in generator.parameters() if p.requires_grad]
    generator.eval()
    ratios, cosines = [], []
    for i, batch in enumerate(trainer.train_loader):
        if i >= num_batches:
            break
        x = inputs_to_device(batch, trainer.device, steps.memory_format)
        logits = generator(x).float()
        bce = steps.spec.bce_weight * logistic_loss(logits, batch["labels"].to(trainer.device))
        z = f_ext(x).float() if steps.spec.conditional else None
        adversarial = -discriminator(sample_label_sets(logits, steps.spec), z).mean()
        g_bce = torch.autograd.grad(bce, params, retain_graph=True, allow_unused=True)
        g_adv = torch.autograd.grad(adversarial, params, allow_unused=True)
        pairs = [(a, b) for a, b in zip(g_adv, g_bce) if b is not None]
        flat_bce = torch.cat([b.flatten() for _, b in pairs])
        flat_adv = torch.cat([(a if a is not None else torch.zeros_like(b)).flatten() for a, b in pairs])
        ratios.append(float(flat_adv.norm() / flat_bce.norm().clamp_min(1e-12)))
        cosines.append(float(torch.nn.functional.cosine_similarity(flat_adv, flat_bce, dim=0)))
    generator.train()
    if not ratios:
        return {}
    return {"grad_ratio_adv_to_bce": float(np.mean(ratios)), "grad_cosine_adv_bce": float(np.mean(cosines))}


def summarize_d_log(metrics_jsonl: Path) -> dict[str, dict[str, float]]:
    """Means of the logged phase-2 losses over the first and the last quarter of the logged steps
    (how D and G evolved: a collapsed critic has ``wasserstein`` ≈ 0 and ``gp`` ≈ 1 or ≈ 0)."""
    if not metrics_jsonl.is_file():
        return {}
    steps = []
    for line in metrics_jsonl.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("phase") == "gan" and "loss_d" in record:
            steps.append(record)
    if not steps:
        return {}
    quarter = max(1, len(steps) // 4)
    out: dict[str, dict[str, float]] = {"num_logged": {"all": float(len(steps))}}
    for key in D_LOG_KEYS:
        values = [s[key] for s in steps if key in s]
        if values:
            out[key] = {
                "first_quarter": float(np.mean(values[:quarter])),
                "last_quarter": float(np.mean(values[-quarter:])),
            }
    return out
