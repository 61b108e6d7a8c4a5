"""The asymmetric loss (``--loss.kind asl``, Ridnik et al., ICCV 2021) against its formula by hand,
BCE as its special case, autograd, extreme logits, torch.compile and AMP; and the option reaching
both places the classification term appears (phase 1, and L_logistic in phase 2's eq. 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastmlgan.config import build_config
from fastmlgan.errors import ConfigError
from fastmlgan.losses import (
    GanSpec,
    LossSpec,
    asymmetric_loss,
    bce_loss,
    classification_loss,
    generator_loss,
    logistic_loss,
)
from fastmlgan.models import Discriminator

# (γ−, γ+, m): the paper's recommendation, fractional exponents, a margin without focusing, focusing without a margin.
PARAMS = [(4.0, 0.0, 0.05), (2.5, 1.5, 0.2), (0.0, 0.0, 0.1), (3.0, 0.5, 0.0), (0.5, 0.0, 0.05)]


def _asl_by_hand(logits, targets, gamma_neg, gamma_pos, clip) -> float:
    """The formula, one label at a time in Python floats:
    L = −Σ_i [y (1−p)^γ+ log p + (1−y) p_m^γ− log(1−p_m)], p = σ(z), p_m = max(p − m, 0),
    summed over labels, averaged over the rows."""
    total = 0.0
    for row_z, row_y in zip(logits, targets):
        for z, y in zip(row_z, row_y):
            p = 1.0 / (1.0 + math.exp(-z))
            p_m = max(p - clip, 0.0)
            total -= y * (1.0 - p) ** gamma_pos * math.log(p) + (1.0 - y) * p_m**gamma_neg * math.log(1.0 - p_m)
    return total / len(logits)


LOGITS = [[2.0, -1.0, 0.3, -3.0, 4.0], [-0.2, 1.5, -2.5, 0.7, -3.5]]
TARGETS = [[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]]


@pytest.mark.parametrize("params", PARAMS, ids=[f"gn{a}-gp{b}-m{c}" for a, b, c in PARAMS])
def test_asl_equals_the_formula_by_hand(params):
    z = torch.tensor(LOGITS, dtype=torch.float64)
    y = torch.tensor(TARGETS, dtype=torch.float64)
    got = asymmetric_loss(z, y, *params).item()
    # fp32 inside (the kit computes every loss in fp32): 1e-6 relative.
    assert got == pytest.approx(_asl_by_hand(LOGITS, TARGETS, *params), rel=1e-6, abs=1e-7)
    # Some negatives lie below the margin (p <= m: no loss at all) and some above it.
    clip = params[2]
    p = torch.sigmoid(z)
    if clip:
        assert ((p <= clip) & (y == 0)).any() and ((p > clip) & (y == 0)).any()


def test_the_hand_computation_tells_the_parameters_apart():
    """Swapping γ− and γ+, dropping the margin or summing over the batch moves the value far
    outside the tolerance above: a formula with one of them wrong cannot pass."""
    z, y = torch.tensor(LOGITS), torch.tensor(TARGETS, dtype=torch.float32)
    got = asymmetric_loss(z, y, 4.0, 1.0, 0.05).item()
    for wrong in ((1.0, 4.0, 0.05), (4.0, 1.0, 0.0), (4.0, 0.0, 0.05), (0.0, 1.0, 0.05)):
        assert got != pytest.approx(_asl_by_hand(LOGITS, TARGETS, *wrong), rel=1e-3)
    assert got != pytest.approx(len(LOGITS) * _asl_by_hand(LOGITS, TARGETS, 4.0, 1.0, 0.05), rel=1e-3)


def test_without_focusing_or_margin_it_is_bce_exactly():
    """γ− = γ+ = 0 and m = 0: eq. (1), the kit's L_logistic, bit for bit. The gradients agree to
    2e-9 (of entries up to 1/64): BCE's backward is its own formula, (σ(z) − y)/N, ASL's goes
    through logsigmoid's."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 80, generator=g) * 6
    z[0, :4] = torch.tensor([100.0, -100.0, 1e4, -1e4])
    y = (torch.rand(64, 80, generator=g) < 0.3).float()
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    asl, bce = asymmetric_loss(za, y, 0.0, 0.0, 0.0), logistic_loss(zb, y)
    assert torch.equal(asl, bce)
    asl.backward()
    bce.backward()
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-8)
    # And the dispatch: --loss.kind bce is L_logistic whatever the ASL parameters say.
    assert torch.equal(classification_loss(z, y, LossSpec("bce", 4.0, 1.0, 0.05)), logistic_loss(z, y))


@pytest.mark.parametrize("params", PARAMS, ids=[f"gn{a}-gp{b}-m{c}" for a, b, c in PARAMS])
def test_gradient_matches_gradcheck_in_float64(params):
    """The loss is computed in fp32 (as every loss here), so gradcheck runs an fp64 copy of the same
    expression: ``asymmetric_loss`` with its ``.float()`` casts lifted to double."""
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(4, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = (torch.rand(4, 6, generator=g) < 0.4).double()

    def in_float64(logits):
        original = torch.Tensor.float
        torch.Tensor.float = lambda t: t.double()
        try:
            return asymmetric_loss(logits, y, *params)
        finally:
            torch.Tensor.float = original

    assert in_float64(z).dtype == torch.float64
    assert torch.autograd.gradcheck(in_float64, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # The fp32 loss's own gradient agrees with the fp64 one.
    z32 = z.detach().float().requires_grad_()
    asymmetric_loss(z32, y, *params).backward()
    (grad64,) = torch.autograd.grad(in_float64(z), z)
    torch.testing.assert_close(z32.grad.double(), grad64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("params", PARAMS, ids=[f"gn{a}-gp{b}-m{c}" for a, b, c in PARAMS])
def test_logits_of_plus_minus_100_and_beyond_are_finite(params):
    gamma_neg, gamma_pos, clip = params
    z = torch.tensor([[100.0, -100.0, 100.0, -100.0, 1e4, -1e4, 1e30, -1e30]], requires_grad=True)
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    loss = asymmetric_loss(z, y, *params)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # The values the formula gives there: a sure positive and a sure negative cost nothing; a
    # confidently wrong positive costs |z| (its (1-p)^γ+ is 1); a confidently wrong negative
    # costs −(1−m)^γ− log m with a margin, |z| without one.
    wrong_negative = -((1 - clip) ** gamma_neg) * math.log(clip) if clip else 100.0
    huge_negative = -((1 - clip) ** gamma_neg) * math.log(clip) if clip else 1e30
    expected = 100.0 + wrong_negative + huge_negative + 1e30
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The gradient of a confidently wrong positive is −1 (ASL's γ+ weight is 1 there), the sure
    # ones' is 0.
    assert grad[0, 1].item() == pytest.approx(-1.0, rel=1e-5)
    assert grad[0, 0].item() == pytest.approx(0.0, abs=1e-30) and grad[0, 3].item() == pytest.approx(0.0, abs=1e-30)


def test_compiled_loss_matches_eager():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(16, 10, generator=g) * 4
    y = (torch.rand(16, 10, generator=g) < 0.3).float()
    compiled = torch.compile(asymmetric_loss, fullgraph=True)
    for params in PARAMS[:2]:
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        eager, comp = asymmetric_loss(za, y, *params), compiled(zb, y, *params)
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
        eager.backward()
        comp.backward()
        torch.testing.assert_close(zb.grad, za.grad, rtol=1e-5, atol=1e-7)


class _Linear(nn.Module):
    def __init__(self, d_in: int, c: int) -> None:
        super().__init__()
        self.layer = nn.Linear(d_in, c)

    def forward(self, x):
        return self.layer(x)


def test_under_bf16_autocast_the_loss_is_fp32_of_the_bf16_logits():
    """AMP: G's logits come out of autocast in bf16; the loss takes them to fp32 first, so it is the
    fp32 loss of exactly those logits (and its gradient reaches G)."""
    torch.manual_seed(3)
    g = _Linear(7, 5)
    x, y = torch.randn(8, 7), (torch.rand(8, 5) < 0.4).float()
    spec = LossSpec("asl", 4.0, 0.0, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bce_loss(g, {"x": x, "y": y}, spec)
        logits = g(x)
    assert logits.dtype == torch.bfloat16 and out["loss_g"].dtype == torch.float32
    assert torch.equal(out["loss_g"], asymmetric_loss(logits.float(), y, 4.0, 0.0, 0.05))
    out["loss_g"].backward()
    assert torch.isfinite(g.layer.weight.grad).all() and g.layer.weight.grad.abs().sum() > 0


def test_loss_kind_reaches_phase_1_and_eq2(monkeypatch):
    """--loss.* through LossSpec.from_config into bce_loss (phase 1) and generator_loss (phase 2's
    α·L_logistic): each gives α·ASL, not α·BCE, with the configured γ−, γ+ and m."""
    cfg = build_config({"loss.kind": "asl", "loss.gamma_neg": "3", "loss.gamma_pos": "1", "loss.clip": "0.1"}, preset="smoke")
    spec = LossSpec.from_config(cfg.loss)
    assert spec == LossSpec("asl", 3.0, 1.0, 0.1)
    torch.manual_seed(4)
    g = _Linear(6, 4)
    x, y = torch.randn(5, 6), (torch.rand(5, 4) < 0.5).float()
    expected = asymmetric_loss(g(x), y, 3.0, 1.0, 0.1)
    assert torch.equal(bce_loss(g, {"x": x, "y": y}, spec)["bce"], expected)
    d = Discriminator(4, 6, proj_dim=8, hidden_dim=8, num_layers=2)
    gan = GanSpec(bce_weight=10.0, gumbel=False)  # no noise: the adversarial term is fixed
    out = generator_loss(d, g, {"x": x, "y": y, "z": x}, gan, spec)
    assert torch.equal(out["bce"], expected)
    bce_out = generator_loss(d, g, {"x": x, "y": y, "z": x}, gan)
    assert torch.equal(bce_out["bce"], logistic_loss(g(x), y))
    torch.testing.assert_close(out["loss_g"] - bce_out["loss_g"], 10.0 * (expected - logistic_loss(g(x), y)))


def test_the_trainer_passes_the_loss_to_both_steps(monkeypatch, tmp_path):
    """The Trainer's phase-1 and phase-2 G steps call the classification term with the config's spec."""
    from fastmlgan.data.sources import embedded
    from fastmlgan.distributed import DistInfo
    from fastmlgan.train.trainer import Trainer

    root = tmp_path / "data"
    embedded.ensure(root, num_train=256, num_val=32, image_size=40, seed=0)
    cfg = build_config(
        {"data.root": str(root), "data.embedded_num_val": "32", "loss.kind": "asl", "loss.gamma_neg": "2"}, preset="smoke"
    )
    seen = []
    import fastmlgan.losses as losses

    real = losses.asymmetric_loss
    monkeypatch.setattr(losses, "asymmetric_loss", lambda *a: seen.append(a[2:]) or real(*a))
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), tmp_path / "run")
    batch = next(iter(trainer.train_loader))
    trainer.steps.bce_step(batch)
    trainer.start_gan_phase()
    x = trainer.steps.model_input(batch)  # the cache's uint8, normalised as the steps do
    trainer.steps.generator_step({"x": x, "y": batch["labels"], "z": trainer.steps.feature_extractor(x)})
    assert seen == [(2.0, 0.0, 0.05), (2.0, 0.0, 0.05)]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("loss.kind", "focal", "--loss.kind: 'focal' is not one of bce, asl"),
     ("loss.gamma_neg", "-1", "--loss.gamma_neg must be a finite number in [0, 100]"),
     ("loss.gamma_pos", "nan", "--loss.gamma_pos must be a finite number in [0, 100]"),
     ("loss.clip", "1", "--loss.clip must be a finite number in [0, 1)")],
)
def test_bad_loss_options_are_one_line(key, value, message):
    with pytest.raises(ConfigError) as info:
        build_config({key: value}, preset="smoke")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
