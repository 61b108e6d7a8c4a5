"""Eqs. (1)-(5) and the Table 3 ablation switches, against hand computations and torch.func."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastmlgan.config import build_config
from fastmlgan.kernels import _dispatch
from fastmlgan.kernels.gradient_penalty import gradient_penalty as explicit_gradient_penalty
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


# ----------------------------------------------------------------------------------------------
# Eq. (4) by hand on a 2-layer D with hand-set weights

LEAK = 0.2  # Discriminator's default LeakyReLU slope
# label_proj (P=2, C=3), feature_proj (P, F=2), body layers 1 and 2 (H=2), out (1, H)
W_Y, B_Y = [[1.0, -0.5, 0.25], [0.5, 1.0, -1.0]], [0.1, -0.2]
W_Z, B_Z = [[0.5, -1.0], [1.0, 0.5]], [0.0, 0.3]
W_1, B_1 = [[1.0, -1.0, 0.5, 0.5], [-0.5, 1.0, 1.0, -1.0]], [0.1, -0.1]
W_2, B_2 = [[1.0, 0.5], [-1.0, 1.0]], [0.2, 0.0]
W_O, B_O = [[1.0, -2.0]], [0.5]


def _hand_set_discriminator(conditional: bool = True) -> Discriminator:
    d = Discriminator(num_labels=3, feature_dim=2, proj_dim=2, hidden_dim=2, num_layers=2, conditional=conditional)
    linears = [d.label_proj, d.feature_proj, d.body[0], d.body[2], d.out]
    with torch.no_grad():
        for linear, (w, b) in zip(linears, [(W_Y, B_Y), (W_Z, B_Z), (W_1, B_1), (W_2, B_2), (W_O, B_O)]):
            linear.weight.copy_(torch.tensor(w))
            linear.bias.copy_(torch.tensor(b))
    return d


def _lrelu(a):
    return np.where(a > 0, a, LEAK * a)


def _slope(a):
    return np.where(a > 0, 1.0, LEAK)


def _d_by_hand(y, z):
    """D(y, z) and ∇_y D(y, z) for one sample, written out layer by layer (float64)."""
    y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
    h0 = np.concatenate([np.dot(W_Y, y) + B_Y, np.dot(W_Z, z) + B_Z])  # projections, concatenated
    a1 = np.dot(W_1, h0) + B_1
    a2 = np.dot(W_2, _lrelu(a1)) + B_2
    score = float(np.dot(W_O, _lrelu(a2))[0] + B_O[0])
    # Backwards: ∂D/∂a2 = w_o ⊙ s2, ∂D/∂a1 = (W_2ᵀ ∂D/∂a2) ⊙ s1, ∂D/∂h0 = W_1ᵀ ∂D/∂a1,
    # and only the label half of h0 depends on y: ∂D/∂y = W_yᵀ (∂D/∂h0)[:P].
    d_a2 = np.asarray(W_O[0]) * _slope(a2)
    d_a1 = np.dot(np.transpose(W_2), d_a2) * _slope(a1)
    d_h0 = np.dot(np.transpose(W_1), d_a1)
    grad_y = np.dot(np.transpose(W_Y), d_h0[:2])
    return score, grad_y


def _eq4_by_hand(batch, fake, epsilon, negative_sampling: bool, gp_weight: float):
    """(L_D, penalty) of eq. (4) with the penalty of eq. (5), from the hand-written D."""

    def mean_score(labels, images):
        return np.mean([_d_by_hand(y, x)[0] for y, x in zip(labels, images)])

    matched = mean_score(batch["matched_y"], batch["matched_x"])
    generated = mean_score(fake, batch["generated_x"])
    # y* = ε y + (1 − ε) ŷ per sample, y the true labels of the generated pairs' images; the
    # gradient is taken w.r.t. the label input only, the image features held fixed.
    norms = []
    for y, y_hat, x, eps in zip(batch["generated_real_y"], fake, batch["generated_x"], epsilon):
        y_star = eps * np.asarray(y) + (1 - eps) * np.asarray(y_hat)
        norms.append(np.sqrt(np.sum(_d_by_hand(y_star, x)[1] ** 2)))
    penalty = np.mean((np.asarray(norms) - 1.0) ** 2)
    if negative_sampling:
        mismatched = mean_score(batch["mismatched_y"], batch["mismatched_x"])
        loss = -matched + 0.5 * generated + 0.5 * mismatched + gp_weight * penalty
    else:  # Table 3 (c): "the third term ... is removed, and the weight of the second term becomes 1"
        loss = -matched + 1.0 * generated + gp_weight * penalty
    return loss, penalty


def _eq4_batch() -> dict[str, torch.Tensor]:
    """Two pairs of each kind; x is the image feature vector itself (f_ext = identity)."""
    batch = {
        "matched_x": [[1.0, 0.5], [-0.5, 1.5]],
        "matched_y": [[1, 0, 1], [0, 1, 0]],
        "generated_x": [[0.25, -1.0], [2.0, 0.0]],
        "generated_real_y": [[1, 1, 0], [0, 0, 1]],
        "mismatched_x": [[-1.0, -0.5], [0.5, 0.5]],
        "mismatched_y": [[1, 1, 1], [0, 0, 1]],
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in batch.items()}


def _numpy_batch(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in batch.items()}


EQ4_LOGITS = [[3.0, -3.0, 2.0], [3.0, 0.5, 1.5]]  # G's output on generated_x: ŷ = σ(ℓ) (no Gumbel)
EQ4_EPSILON = [0.75, 0.8]


def _fixed_epsilon_penalty(kind: str):
    eps = torch.tensor(EQ4_EPSILON)
    if kind == "autograd":
        return lambda d, real, fake, z: gradient_penalty_autograd(d, real, fake, z, eps)
    return lambda d, real, fake, z: explicit_gradient_penalty(d, real, fake, z, epsilon=eps)


@pytest.mark.parametrize("penalty", ["autograd", "explicit"])
@pytest.mark.parametrize("negative_sampling", [True, False])
def test_discriminator_loss_is_eq4(negative_sampling, penalty):
    spec = GanSpec(negative_sampling=negative_sampling, gumbel=False, gp_weight=10.0)
    d = _hand_set_discriminator()
    g = _FixedGenerator(torch.tensor(EQ4_LOGITS))
    batch = _eq4_batch()
    out = discriminator_loss_from_images(d, g, _IdentityFeatures(), batch, spec, penalty=_fixed_epsilon_penalty(penalty))

    fake = 1.0 / (1.0 + np.exp(-np.asarray(EQ4_LOGITS)))
    loss, gp = _eq4_by_hand(_numpy_batch(batch), fake, EQ4_EPSILON, negative_sampling, spec.gp_weight)
    # float32 on the torch side, float64 by hand: agreement to ~1e-7 relative; 1e-5 leaves room.
    assert out["gp"].item() == pytest.approx(gp, rel=1e-5)
    assert out["loss_d"].item() == pytest.approx(loss, rel=1e-5)
    # G gets no gradient from the D loss; every D parameter does.
    out["loss_d"].backward()
    assert g.weight.grad is None
    assert all(p.grad is not None for p in d.parameters())


def _pre_activations(d: Discriminator, labels, images) -> np.ndarray:
    """The pre-activations of D's two hidden layers, read from the project's module with hooks."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for layer in (d.body[0], d.body[2])]
    try:
        with torch.no_grad():
            d(torch.tensor(np.asarray(labels), dtype=torch.float32), torch.tensor(np.asarray(images), dtype=torch.float32))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([s.reshape(-1) for s in seen]).double().numpy()


def test_eq4_inputs_make_the_hand_computation_sensitive():
    # D is piecewise linear, so ∇_y D changes only where a LeakyReLU changes slope: the inputs are
    # chosen (a search over small round values) so that every D evaluation has pre-activations on
    # both sides of 0, none near it (float32 and float64 take the same branch). Read from the
    # project's D (forward hooks), they equal the hand-written D's.
    batch = _numpy_batch(_eq4_batch())
    fake = 1.0 / (1.0 + np.exp(-np.asarray(EQ4_LOGITS)))
    y_star = [e * y + (1 - e) * f for e, y, f in zip(EQ4_EPSILON, batch["generated_real_y"], fake)]
    labels = [*batch["matched_y"], *fake, *batch["mismatched_y"], *y_star]
    images = [*batch["matched_x"], *batch["generated_x"], *batch["mismatched_x"], *batch["generated_x"]]
    by_hand = []
    for y, x in zip(labels, images):
        h0 = np.concatenate([np.dot(W_Y, y) + B_Y, np.dot(W_Z, x) + B_Z])
        a1 = np.dot(W_1, h0) + B_1
        by_hand.append((a1, np.dot(W_2, _lrelu(a1)) + B_2))
    by_hand = np.concatenate([np.concatenate([a1 for a1, _ in by_hand]), np.concatenate([a2 for _, a2 in by_hand])])
    pre = _pre_activations(_hand_set_discriminator(), labels, images)
    np.testing.assert_allclose(pre, by_hand, rtol=1e-5, atol=1e-6)
    assert (pre > 0).sum() >= 4 and (pre < 0).sum() >= 4 and np.abs(pre).min() > 0.05, pre

    # The project's penalty, on these inputs, is far from what y* built wrongly gives (ε on the
    # wrong end, or another batch's labels as y), so test_discriminator_loss_is_eq4 can see those.
    spec = GanSpec(gumbel=False)
    d, g = _hand_set_discriminator(), _FixedGenerator(torch.tensor(EQ4_LOGITS))
    for penalty in ("autograd", "explicit"):
        gp = discriminator_loss_from_images(
            d, g, _IdentityFeatures(), _eq4_batch(), spec, penalty=_fixed_epsilon_penalty(penalty)
        )["gp"].item()
        swapped = _eq4_by_hand(batch, fake, [1 - e for e in EQ4_EPSILON], True, 10.0)[1]
        other_y = _eq4_by_hand(dict(batch, generated_real_y=batch["matched_y"]), fake, EQ4_EPSILON, True, 10.0)[1]
        assert min(abs(gp - swapped), abs(gp - other_y)) > 0.5 * gp, penalty


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


# Uniforms the Gumbel noise is made from, for the (2, 3) logits of the hand examples: the torch
# path's torch.rand is replaced by these, so the sample is σ(β (ℓ + log u − log(1 − u))) by hand.
FIXED_U = [[0.2, 0.7, 0.5], [0.9, 0.35, 0.6]]


def _fixed_uniforms(monkeypatch) -> None:
    """Route the Gumbel sigmoid to its torch path and make its torch.rand return ``FIXED_U``."""
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    real_rand = torch.rand

    def rand(*size, generator=None, device=None, dtype=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        if shape != (2, 3):
            return real_rand(*size, generator=generator, device=device, dtype=dtype, **kwargs)
        return torch.tensor(FIXED_U, dtype=dtype or torch.float32, device=device)

    monkeypatch.setattr(torch, "rand", rand)


def _gumbel_by_hand(logits, inv_temperature: float) -> np.ndarray:
    u = np.asarray(FIXED_U)
    return 1.0 / (1.0 + np.exp(-inv_temperature * (np.asarray(logits) + np.log(u) - np.log(1.0 - u))))


def _bce_by_hand(logits, y) -> float:
    """Eq. (1), sign restored: −Σ_i [y_i log σ(ℓ_i) + (1 − y_i) log(1 − σ(ℓ_i))], batch mean."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    y = np.asarray(y, np.float64)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(axis=1)))


def _generator_loss_by_hand(logits, x, y, bce_weight: float, inv_temperature: float) -> float:
    """Eqs. (2)-(3): −E[D(ŷ, x)] + α L_logistic, ŷ the Gumbel sample of FIXED_U, D the hand-written one."""
    fake = _gumbel_by_hand(logits, inv_temperature)
    adversarial = -np.mean([_d_by_hand(f, z)[0] for f, z in zip(fake, np.asarray(x))])
    return adversarial + bce_weight * _bce_by_hand(logits, y)


G_LOGITS = [[1.5, -0.5, 0.25], [-1.0, 2.0, 0.5]]
G_X = [[0.5, -0.25], [1.0, 1.5]]  # the image features themselves (f_ext = identity)
G_Y = [[1, 0, 1], [0, 1, 0]]


def test_generator_loss_is_eq2(monkeypatch):
    # The paper's α = 10 and β = 0.9 (§4.1), written here rather than read from GanSpec.
    _fixed_uniforms(monkeypatch)
    d = _hand_set_discriminator()
    g = _FixedGenerator(torch.tensor(G_LOGITS))
    x, y = torch.tensor(G_X), torch.tensor(G_Y, dtype=torch.float32)
    out = generator_loss_from_images(d, g, _IdentityFeatures(), {"x": x, "y": y}, GanSpec())
    expected = _generator_loss_by_hand(G_LOGITS, G_X, G_Y, bce_weight=10.0, inv_temperature=0.9)
    assert out["loss_g"].item() == pytest.approx(expected, rel=1e-5)
    assert out["bce"].item() == pytest.approx(_bce_by_hand(G_LOGITS, G_Y), rel=1e-6)
    # D is only a critic here: a full backward leaves its parameters without gradients.
    out["loss_g"].backward(retain_graph=True)
    assert all(p.grad is None for p in d.parameters())
    # The adversarial term pushes G: d loss / d w for G's logits w·ℓ, by central differences of the
    # hand computation (the fixed uniforms make it deterministic), against autograd's.
    (grad,) = torch.autograd.grad(out["loss_g"], g.weight)
    h = 1e-4
    numeric = (
        _generator_loss_by_hand(np.asarray(G_LOGITS) * (1 + h), G_X, G_Y, 10.0, 0.9)
        - _generator_loss_by_hand(np.asarray(G_LOGITS) * (1 - h), G_X, G_Y, 10.0, 0.9)
    ) / (2 * h)
    bce_only = (_bce_by_hand(np.asarray(G_LOGITS) * (1 + h), G_Y) - _bce_by_hand(np.asarray(G_LOGITS) * (1 - h), G_Y)) / (2 * h)
    assert grad.item() == pytest.approx(numeric, rel=1e-3)
    assert abs(numeric - 10.0 * bce_only) > 1e-2  # the adversarial term's share is not negligible


def test_config_weights_reach_both_losses(monkeypatch):
    """α, λ and β from a config, all different (and λ ≠ 1/β), through GanSpec.from_config into
    L'_G (eqs. 2-3) and L_D (eq. 4), against the hand computations with the numbers written here:
    swapping any two of them, or using 1/β, moves a loss far outside the tolerance."""
    alpha, lam, beta = 3.0, 7.0, 0.25
    cfg = build_config({"gan.bce_weight": "3", "gan.gp_weight": "7", "gan.inv_temperature": "0.25"}, preset="smoke")
    spec = GanSpec.from_config(cfg.gan)
    _fixed_uniforms(monkeypatch)
    d = _hand_set_discriminator()

    g = _FixedGenerator(torch.tensor(G_LOGITS))
    batch = {"x": torch.tensor(G_X), "y": torch.tensor(G_Y, dtype=torch.float32)}
    loss_g = generator_loss_from_images(d, g, _IdentityFeatures(), batch, spec)["loss_g"].item()
    assert loss_g == pytest.approx(_generator_loss_by_hand(G_LOGITS, G_X, G_Y, alpha, beta), rel=1e-5)
    for wrong_alpha, wrong_beta in ((lam, beta), (alpha, 1 / beta), (beta, alpha), (1 / beta, beta)):
        assert loss_g != pytest.approx(_generator_loss_by_hand(G_LOGITS, G_X, G_Y, wrong_alpha, wrong_beta), rel=1e-3)

    g = _FixedGenerator(torch.tensor(EQ4_LOGITS))
    eq4 = _eq4_batch()
    out = discriminator_loss_from_images(d, g, _IdentityFeatures(), eq4, spec, penalty=_fixed_epsilon_penalty("explicit"))
    fake = _gumbel_by_hand(EQ4_LOGITS, beta)
    loss, gp = _eq4_by_hand(_numpy_batch(eq4), fake, EQ4_EPSILON, True, lam)
    assert out["gp"].item() == pytest.approx(gp, rel=1e-5)
    assert out["loss_d"].item() == pytest.approx(loss, rel=1e-5)
    for wrong_lam, wrong_beta in ((alpha, beta), (1 / beta, beta), (lam, 1 / beta)):
        wrong = _eq4_by_hand(_numpy_batch(eq4), _gumbel_by_hand(EQ4_LOGITS, wrong_beta), EQ4_EPSILON, True, wrong_lam)[0]
        assert out["loss_d"].item() != pytest.approx(wrong, rel=1e-3)
