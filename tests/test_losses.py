"""Eqs. (1)-(5) and the Table 3 ablation switches, against hand computations and torch.func."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastmlgan.losses import (
    GanSpec,
    discriminator_loss_from_images,
    generator_loss_from_images,
    gradient_penalty_autograd,
    logistic_loss,
    sample_label_sets,
)
from fastmlgan.models import Discriminator

C, F_DIM, B = 5, 7, 6


def test_logistic_loss_by_hand():
    # eq. (1), sign restored: -[1*log σ(0)] - [(1-0)*log(1-σ(2))] = log 2 + log(1+e²)
    logits = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([[1.0, 0.0]])
    expected = math.log(2) + math.log(1 + math.e**2)
    assert logistic_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    # Summed over labels, averaged over the batch: two identical rows give the same value.
    assert logistic_loss(logits.repeat(2, 1), y.repeat(2, 1)).item() == pytest.approx(expected, rel=1e-6)


def _penalty_by_torch_func(d: Discriminator, real, fake, z, eps):
    """An independent eq. (5): per-sample input gradients from torch.func, then the penalty."""
    interp = eps * real + (1 - eps) * fake

    def score(y_row, z_row):
        return d(y_row[None], None if z_row is None else z_row[None]).squeeze()

    if z is None:
        grads = torch.func.vmap(lambda y: torch.func.grad(lambda yy: score(yy, None))(y))(interp)
    else:
        grads = torch.func.vmap(torch.func.grad(score), in_dims=(0, 0))(interp, z)
    return ((grads.pow(2).sum(1).sqrt() - 1) ** 2).mean()


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("num_layers,hidden", [(1, 8), (3, 16), (8, 32)])
def test_gradient_penalty_matches_independent_reference(conditional, num_layers, hidden):
    torch.manual_seed(num_layers * 10 + hidden)
    d = Discriminator(C, F_DIM, proj_dim=6, hidden_dim=hidden, num_layers=num_layers, conditional=conditional)
    real = torch.randint(0, 2, (B, C)).float()
    fake = torch.rand(B, C)
    z = torch.randn(B, F_DIM) if conditional else None
    eps = torch.rand(B, 1)

    gp = gradient_penalty_autograd(d, real, fake, z, eps)
    ref = _penalty_by_torch_func(d, real, fake, z, eps)
    assert gp.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)

    g1 = torch.autograd.grad(gp, list(d.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(ref, list(d.parameters()), allow_unused=True)
    for (name, _), a, b in zip(d.named_parameters(), g1, g2):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_penalty_input_gradient_by_finite_differences():
    # The gradient the penalty uses is ∇_y D(y, z): check it against central differences in float64.
    torch.manual_seed(0)
    d = Discriminator(C, F_DIM, proj_dim=4, hidden_dim=8, num_layers=2).double()
    y = torch.rand(1, C, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, F_DIM, dtype=torch.float64)
    (g,) = torch.autograd.grad(d(y, z).sum(), y)
    h = 1e-6
    for i in range(C):
        e = torch.zeros_like(y)
        e[0, i] = h
        fd = (d(y + e, z) - d(y - e, z)).item() / (2 * h)
        assert g[0, i].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)
    # Penalty of a single sample at ε=1 is (‖g‖ - 1)².
    gp = gradient_penalty_autograd(d, y.detach(), torch.zeros_like(y), z, torch.ones(1, 1, dtype=torch.float64))
    assert gp.item() == pytest.approx((g.norm().item() - 1) ** 2, rel=1e-6)


class _FixedGenerator(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.logits[: x.shape[0]] * self.weight


class _IdentityFeatures(nn.Module):
    def forward(self, x):
        return x


def _batch():
    torch.manual_seed(1)
    return {
        "matched_x": torch.randn(B, F_DIM),
        "matched_y": torch.randint(0, 2, (B, C)).float(),
        "generated_x": torch.randn(B, F_DIM),
        "generated_real_y": torch.randint(0, 2, (B, C)).float(),
        "mismatched_x": torch.randn(B, F_DIM),
        "mismatched_y": torch.randint(0, 2, (B, C)).float(),
    }


def _expected_d_loss(d, batch, fake, spec, gp):
    s_m = d(batch["matched_y"], batch["matched_x"]).mean()
    s_g = d(fake, batch["generated_x"]).mean()
    s_n = d(batch["mismatched_y"], batch["mismatched_x"]).mean()
    if spec.negative_sampling:
        return -s_m + 0.5 * s_g + 0.5 * s_n + spec.gp_weight * gp
    return -s_m + 1.0 * s_g + spec.gp_weight * gp


@pytest.mark.parametrize("negative_sampling", [True, False])
def test_discriminator_loss_is_eq4(negative_sampling):
    spec = GanSpec(negative_sampling=negative_sampling, gumbel=False)  # σ(ℓ): deterministic ŷ
    torch.manual_seed(2)
    d = Discriminator(C, F_DIM, proj_dim=4, hidden_dim=8, num_layers=2)
    logits = torch.randn(B, C)
    g = _FixedGenerator(logits)
    batch = _batch()
    eps = torch.rand(B, 1)
    fixed_penalty = lambda disc, real, fake, z: gradient_penalty_autograd(disc, real, fake, z, eps)  # noqa: E731
    out = discriminator_loss_from_images(d, g, _IdentityFeatures(), batch, spec, penalty=fixed_penalty)
    fake = torch.sigmoid(logits)
    gp = gradient_penalty_autograd(d, batch["generated_real_y"], fake, batch["generated_x"], eps)
    expected = _expected_d_loss(d, batch, fake, spec, gp)
    assert out["loss_d"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["gp"].item() == pytest.approx(gp.item(), rel=1e-5)
    # Without negative sampling the mismatched pair has no influence at all (Table 3 (c)).
    batch2 = dict(batch, mismatched_y=1 - batch["mismatched_y"])
    out2 = discriminator_loss_from_images(d, g, _IdentityFeatures(), batch2, spec, penalty=fixed_penalty)
    if negative_sampling:
        assert out2["loss_d"].item() != pytest.approx(out["loss_d"].item(), rel=1e-6)
    else:
        assert out2["loss_d"].item() == pytest.approx(out["loss_d"].item(), rel=1e-6)
    # G gets no gradient from the D loss.
    out["loss_d"].backward()
    assert g.weight.grad is None
    assert all(p.grad is not None for p in d.parameters())


def test_unconditional_discriminator_ignores_images():
    spec = GanSpec(conditional=False, gumbel=False)
    torch.manual_seed(3)
    d = Discriminator(C, F_DIM, proj_dim=4, hidden_dim=8, num_layers=2, conditional=False)
    assert d.feature_proj is None

    class _Forbidden(nn.Module):
        def forward(self, x):
            raise AssertionError("f_ext must not run for an unconditional D")

    g = _FixedGenerator(torch.randn(B, C))
    batch = _batch()
    eps = torch.rand(B, 1)
    pen = lambda disc, real, fake, z: gradient_penalty_autograd(disc, real, fake, z, eps)  # noqa: E731
    a = discriminator_loss_from_images(d, g, _Forbidden(), batch, spec, penalty=pen)["loss_d"]
    b = discriminator_loss_from_images(d, g, _Forbidden(), dict(batch, matched_x=batch["matched_x"] * 5), spec, penalty=pen)["loss_d"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # The conditional D does look at the images.
    dc = Discriminator(C, F_DIM, proj_dim=4, hidden_dim=8, num_layers=2)
    spec_c = GanSpec(gumbel=False)
    a = discriminator_loss_from_images(dc, g, _IdentityFeatures(), batch, spec_c, penalty=pen)["loss_d"]
    b = discriminator_loss_from_images(dc, g, _IdentityFeatures(), dict(batch, matched_x=batch["matched_x"] * 5), spec_c, penalty=pen)
    assert a.item() != pytest.approx(b["loss_d"].item(), rel=1e-6)


def test_sampling_switches():
    logits = torch.randn(64, C)
    # Table 3 (e): no Gumbel sigmoid, D is fed σ(ℓ) itself.
    no_gumbel = sample_label_sets(logits, GanSpec(gumbel=False))
    torch.testing.assert_close(no_gumbel, torch.sigmoid(logits))
    torch.manual_seed(0)
    a = sample_label_sets(logits, GanSpec())
    b = sample_label_sets(logits, GanSpec())
    assert not torch.allclose(a, b)  # fresh noise every call
    assert a.dtype == torch.float32 and ((a > 0) & (a < 1)).all()
    hard = sample_label_sets(logits, GanSpec(hard_samples=True))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}


def test_generator_loss_is_eq2():
    spec = GanSpec()
    torch.manual_seed(4)
    d = Discriminator(C, F_DIM, proj_dim=4, hidden_dim=8, num_layers=2)
    logits = torch.randn(B, C)
    g = _FixedGenerator(logits)
    x, y = torch.randn(B, F_DIM), torch.randint(0, 2, (B, C)).float()
    torch.manual_seed(9)
    out = generator_loss_from_images(d, g, _IdentityFeatures(), {"x": x, "y": y}, spec)
    torch.manual_seed(9)
    from fastmlgan.kernels.gumbel_sigmoid import gumbel_sigmoid

    fake = gumbel_sigmoid(logits, 0.9)
    expected = -d(fake, x).mean() + 10.0 * logistic_loss(logits, y)
    assert out["loss_g"].item() == pytest.approx(expected.item(), rel=1e-5)
    # D is only a critic here: a full backward leaves its parameters without gradients.
    out["loss_g"].backward(retain_graph=True)
    assert all(p.grad is None for p in d.parameters())
    g.weight.grad = None
    # The adversarial term pushes G's logits: its gradient is non-zero and differs from BCE's alone.
    (grad_full,) = torch.autograd.grad(out["loss_g"], g.weight)
    (grad_bce,) = torch.autograd.grad(10.0 * logistic_loss(g(x), y), g.weight)
    assert abs(grad_full.item() - grad_bce.item()) > 1e-6
