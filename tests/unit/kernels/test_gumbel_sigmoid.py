"""Gumbel sigmoid (§3.2): kernels and torch path against the reference, sampler statistics, the op.

The Triton cases run on CPU through Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1
before anything imports triton (see fastmlgan/kernels/_dispatch.py).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from kernel_helpers import seeded_logistic_noise

from fastmlgan.errors import ConfigError
from fastmlgan.kernels import _dispatch
from fastmlgan.kernels.gumbel_sigmoid import EPS, gumbel_sigmoid, gumbel_sigmoid_reference

# Each statistical test below fails by chance with probability at most this (Hoeffding / DKW).
FALSE_FAILURE_RATE = 1e-6

TRITON_HERE = torch.cuda.is_available() or _dispatch.triton_interpreter_active()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton" and not TRITON_HERE:
        pytest.skip("no Triton here: triton is missing, or was imported before TRITON_INTERPRET=1 was set")
    monkeypatch.setenv(_dispatch.ENV_VAR, request.param)
    return request.param


def _seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=DEVICE)


def _gumbel_op(logits, seed, inv_temperature=0.9, hard=False):
    return torch.ops.fastmlgan.gumbel_sigmoid(logits, seed, inv_temperature, hard)


# Forward outputs are fp32 from upcast logits in every dtype; gradients are rounded to the logits'
# dtype (bf16 keeps 8 bits, fp16 11), so only they get the looser relative tolerance.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# tl.sigmoid and torch.sigmoid differ by up to an ulp of ŷ (6e-8 near 1), which moves 1 − ŷ, and so
# the gradient g β ŷ (1 − ŷ), by up to g β · 6e-8 in absolute terms however small 1 − ŷ is.
SIGMOID_ULP = 1.2e-7


def _ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """sup_x |F_a(x) − F_b(x)| of the two empirical CDFs (ties handled: CDFs are right-continuous)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    f_a = torch.searchsorted(a, grid, right=True) / len(a)
    f_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (f_a - f_b).abs().max().item()


# Each way to draw a Gumbel-sigmoid sample: the public call on the torch path (eager, and compiled,
# where inductor's RNG draws the noise), the registered op with its torch implementation inside,
# and the public call on the Triton path (Philox in the kernel).
SAMPLERS = ["torch eager", "torch compiled", "custom op, torch inside", "triton"]
KS_LEVELS = [-2.0, -0.5, 0.0, 1.5]


def _draw(sampler: str, logits: torch.Tensor, inv_temperature: float, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton" if sampler == "triton" else "torch")
    if sampler == "custom op, torch inside":
        return _gumbel_op(logits, _seed(4321), inv_temperature)
    torch.manual_seed(1234)
    if sampler == "torch compiled":
        return torch.compile(lambda x: gumbel_sigmoid(x, inv_temperature), fullgraph=True)(logits)
    return gumbel_sigmoid(logits, inv_temperature)


@pytest.mark.parametrize("inv_temperature", [0.5, 0.9])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_distribution_is_relaxed_bernoulli(sampler, inv_temperature, monkeypatch):
    # The op against torch.distributions.RelaxedBernoulli(temperature = 1/β, logits = ℓ), an
    # independently written sampler of σ((ℓ + L)/T), L logistic: a two-sample Kolmogorov–Smirnov
    # test per logit level. If both samples come from one CDF F, the distance of each empirical
    # CDF to F exceeds t = sqrt(ln(4K/α) / 2n) with probability ≤ α/(2K) (DKW with Massart's
    # constant), so over the K levels and both samples the two-sample distance exceeds 2t with
    # probability ≤ α = FALSE_FAILURE_RATE. The samplers' clamps (u to [1e-6, 1 − 1e-6] here,
    # [1.2e-7, 1 − 1.2e-7] and ŷ to the same in torch.distributions, whose clamp of ŷ is applied to
    # ours too) move the CDFs by < 1e-5, added to the bound. Seeds are fixed, so the outcome is
    # deterministic. It fails on a wrong temperature (β applied as 1/β moves the CDF by ≥ 0.046 at
    # β = 0.9 and 0.27 at β = 0.5, against a bound of 0.032), on β applied to ℓ or to the noise only,
    # and on a sign error in one of the noise's two logs. Flipping the sign of the whole noise, or
    # swapping u and 1 − u, leaves the distribution unchanged (L is symmetric): no test of the
    # samples can or should see it.
    if sampler == "triton" and not TRITON_HERE:
        pytest.skip("no Triton here: triton is missing, or was imported before TRITON_INTERPRET=1 was set")
    n = 2**15
    levels = torch.tensor(KS_LEVELS)
    ours = _draw(sampler, levels.repeat(n, 1).to(DEVICE), inv_temperature, monkeypatch).cpu()
    torch.manual_seed(99)
    reference = torch.distributions.RelaxedBernoulli(torch.tensor(1.0 / inv_temperature), logits=levels).sample((n,))
    tiny = torch.finfo(torch.float32).eps  # torch.distributions' clamp_probs
    ours = ours.clamp(tiny, 1.0 - tiny)
    t = math.sqrt(math.log(4 * len(KS_LEVELS) / FALSE_FAILURE_RATE) / (2 * n))
    for k, level in enumerate(KS_LEVELS):
        distance = _ks_two_sample(ours[:, k], reference[:, k])
        assert distance < 2 * t + 1e-5, f"logit {level}, β {inv_temperature}: KS distance {distance:.4f} ≥ {2 * t:.4f}"


@pytest.mark.parametrize("shape", [(3, 5), (17, 81), (64, 80), (2, 3, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_triton_kernels_match_reference(shape, dtype, hard, monkeypatch):
    # The kernels' formula against the torch reference's, given the same noise (the torch path's
    # own implementation is that reference: test_sample_distribution_is_relaxed_bernoulli checks it).
    if not TRITON_HERE:
        pytest.skip("no Triton here: triton is missing, or was imported before TRITON_INTERPRET=1 was set")
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, hard)).encode()))
    logits = (3 * torch.randn(shape, generator=gen)).to(device=DEVICE, dtype=dtype)
    grad_out = torch.randn(shape, generator=gen).to(DEVICE)
    inv_temperature = 0.5 + torch.rand((), generator=gen).item()
    seed = _seed(int(torch.randint(0, 2**62, (), generator=gen)))

    x = logits.clone().requires_grad_(True)
    out = _gumbel_op(x, seed, inv_temperature, hard)
    out.backward(grad_out)

    noise = seeded_logistic_noise(seed, shape, DEVICE)
    assert noise.abs().max() <= -math.log(EPS) + 1e-4  # u kept in [EPS, 1 - EPS]
    x_ref = logits.clone().requires_grad_(True)
    ref = gumbel_sigmoid_reference(x_ref, noise, inv_temperature, hard)
    ref.backward(grad_out)

    assert out.dtype == torch.float32 and out.shape == logits.shape
    assert x.grad.dtype == dtype
    if hard:
        soft = gumbel_sigmoid_reference(logits, noise, inv_temperature)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        # tl.sigmoid and torch.sigmoid may round an exact-0.5 tie apart; nothing else may differ.
        differ = out != ref.detach()
        assert not differ.any() or (soft[differ] - 0.5).abs().max() < 1e-6
    else:
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-7)
    atol = max(SIGMOID_ULP * inv_temperature * grad_out.abs().max().item(), 1e-6 if dtype != torch.float32 else 0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=GRAD_RTOL[dtype], atol=atol)


# torch.rand draws from [0, 1) in steps of 2**-24: its extremes, which the clamp to [EPS, 1 - EPS]
# must keep finite (u = 0 gives log 0 = -inf; u = 1 - 2**-24 gives noise 16.6, past the bound).
RAND_EXTREMES = [0.0, 1.0 - 2.0**-24]


@pytest.mark.parametrize("u", RAND_EXTREMES, ids=["u=0", "u=1-2^-24"])
def test_torch_path_noise_stays_finite_and_bounded_at_the_ends_of_rand(u, monkeypatch):
    """The torch path (public call and the op's torch implementation) with torch.rand returning
    one of its extremes everywhere: finite noise within |log EPS|, samples in (0, 1), finite
    gradients. Probability 2**-24 per element each; a 256 x 80 batch meets one every ~800 steps."""
    from fastmlgan.kernels.gumbel_sigmoid import logistic_noise

    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    real_rand = torch.rand

    def rand(*size, generator=None, device=None, dtype=None, **kwargs):
        out = real_rand(*size, generator=generator, device=device, dtype=dtype, **kwargs)
        return out.fill_(u)

    monkeypatch.setattr(torch, "rand", rand)
    bound = -math.log(EPS) + 1e-4
    for generator in (None, torch.Generator().manual_seed(0)):
        noise = logistic_noise((64, 80), torch.device("cpu"), generator)
        assert torch.isfinite(noise).all() and noise.abs().max() <= bound, noise.abs().max()
        assert (noise < 0).all() if u == 0.0 else (noise > 0).all()  # the clamp keeps the side
    logits = torch.linspace(-20, 20, 64 * 80).reshape(64, 80).requires_grad_(True)
    soft = gumbel_sigmoid(logits, 0.9)
    assert torch.isfinite(soft).all() and ((soft >= 0) & (soft <= 1)).all()
    (grad,) = torch.autograd.grad(soft.sum(), logits)
    assert torch.isfinite(grad).all()
    op = _gumbel_op(logits.detach(), torch.tensor(5, dtype=torch.int64), 0.9, False)  # the op, torch inside
    assert torch.isfinite(op).all()
    # At ℓ = 0 the soft sample is σ(β · noise): with the clamp, exactly σ(±β log((1 - EPS) / EPS)).
    at_zero = gumbel_sigmoid(torch.zeros(1, 1), 0.9).item()
    clamped = EPS if u == 0.0 else 1.0 - EPS
    expected = 1.0 / (1.0 + math.exp(-0.9 * (math.log(clamped) - math.log1p(-clamped))))
    assert at_zero == pytest.approx(expected, rel=1e-4)


def test_non_contiguous_logits(backend):
    logits = torch.randn(81, 17, device=DEVICE).t()
    seed = _seed(7)
    noise = seeded_logistic_noise(seed, logits.shape, DEVICE)
    torch.testing.assert_close(_gumbel_op(logits, seed), gumbel_sigmoid_reference(logits, noise), rtol=1e-5, atol=1e-7)


def test_noise_is_logistic(backend):
    # DKW: P(sup_x |F_n(x) − F(x)| > t) ≤ 2 exp(−2 n t²). The logistic CDF is σ(x); the clamp at EPS
    # moves it by at most EPS.
    n = 2**16
    noise = seeded_logistic_noise(_seed(2024), (n,), DEVICE).double().sort().values.cpu()
    empirical_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    cdf = torch.sigmoid(noise)
    sup = torch.maximum((empirical_hi - cdf).abs(), (empirical_hi - 1.0 / n - cdf).abs()).max().item()
    t = math.sqrt(math.log(2 / FALSE_FAILURE_RATE) / (2 * n)) + EPS
    assert sup < t, f"KS distance {sup:.4f} ≥ {t:.4f}"


def test_same_seed_same_sample_different_seed_differs(backend):
    logits = torch.randn(17, 81, device=DEVICE)
    a = _gumbel_op(logits, _seed(11))
    assert torch.equal(a, _gumbel_op(logits, _seed(11)))
    b = _gumbel_op(logits, _seed(12))
    # Two independent continuous samples agree on an element with probability 0.
    assert (a != b).float().mean() > 0.99
    # A seed above 2**32 uses Philox's high key word too.
    c = _gumbel_op(logits, _seed(11 + 2**40))
    assert (a != c).float().mean() > 0.99


def test_public_call_follows_torch_rng(backend):
    logits = torch.randn(5, 80, device=DEVICE)
    torch.manual_seed(3)
    a = gumbel_sigmoid(logits)
    torch.manual_seed(3)
    assert torch.equal(a, gumbel_sigmoid(logits))
    assert not torch.equal(a, gumbel_sigmoid(logits))
    gen = torch.Generator(device=DEVICE)
    b = gumbel_sigmoid(logits, generator=gen.manual_seed(5))
    assert torch.equal(b, gumbel_sigmoid(logits, generator=gen.manual_seed(5)))


@pytest.mark.parametrize("inv_temperature", [0.1, 0.9, 5.0])
def test_hard_sample_is_bernoulli_sigmoid_of_logit(backend, inv_temperature):
    # 1[σ(β(ℓ + n)) > 0.5] = 1[ℓ + n > 0] is Bernoulli(σ(ℓ)) whatever β (up to the EPS clamp,
    # ≤ 1e-6). Hoeffding on each of the K columns, union bound: a column mean is off by more than
    # t with probability ≤ 2K exp(−2 n t²) = FALSE_FAILURE_RATE.
    n, levels = 8192, torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.5, 2.0])
    logits = levels.repeat(n, 1).to(DEVICE)
    hard = _gumbel_op(logits, _seed(int(inv_temperature * 1000)), inv_temperature, True)
    t = math.sqrt(math.log(2 * len(levels) / FALSE_FAILURE_RATE) / (2 * n)) + EPS
    frequency = hard.mean(dim=0).cpu()
    assert (frequency - torch.sigmoid(levels)).abs().max() < t, (frequency, torch.sigmoid(levels))


# numpy, which runs the interpreter, warns when exp(−β x) overflows to inf; σ is then exactly 0.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_large_inverse_temperature_gives_near_binary_soft_samples(backend):
    # E|ŷ − 1[ℓ+n > 0]| = E σ(−β|ℓ+n|) ≤ 2 · ¼ · ∫₀^∞ σ(−βx) dx = ln 2 / (2β): the density of ℓ+n
    # is at most ¼. Terms lie in [0, ½]: Hoeffding gives the mean ≤ bound + t except with
    # probability FALSE_FAILURE_RATE.
    n, beta = 2**14, 100.0
    logits = torch.randn(n, device=DEVICE)
    seed = _seed(99)
    soft = _gumbel_op(logits, seed, beta)
    distance = (soft - (soft > 0.5).float()).abs().mean().item()
    t = math.sqrt(0.25 * math.log(1 / FALSE_FAILURE_RATE) / (2 * n))
    assert distance < math.log(2) / (2 * beta) + t
    # The same noise at β = 0.9 is far from binary: β is really applied.
    assert (_gumbel_op(logits, seed, 0.9) - (soft > 0.5).float()).abs().mean() > 0.2


def test_hard_backward_regenerates_the_forward_noise(backend):
    # Behind a hard sample the backward regenerates ŷ from the seed: its gradient must be
    # β ŷ (1 − ŷ) of the soft sample the forward thresholded (the noise must be the forward's).
    logits = torch.randn(64, 80, device=DEVICE, requires_grad=True)
    seed = _seed(5)
    hard = _gumbel_op(logits, seed, 0.7, True)
    hard.sum().backward()
    soft = _gumbel_op(logits.detach(), seed, 0.7, False)
    assert torch.equal(hard, (soft > 0.5).float())
    torch.testing.assert_close(logits.grad, 0.7 * soft * (1 - soft), rtol=1e-5, atol=1e-7)
    # Both backward routes of the op agree.
    grad_out = torch.randn(64, 80, device=DEVICE)
    from_soft = torch.ops.fastmlgan.gumbel_sigmoid_backward(grad_out, logits.detach(), seed, 0.7, soft)
    regenerated = torch.ops.fastmlgan.gumbel_sigmoid_backward(grad_out, logits.detach(), seed, 0.7, None)
    torch.testing.assert_close(from_soft, regenerated, rtol=1e-6, atol=1e-7)


def test_public_hard_sample_is_straight_through(backend):
    # Same RNG state, same noise: the hard sample thresholds the soft one, and its gradient is the
    # soft sample's, β ŷ (1 − ŷ) g, on the path the public call takes (plain torch ops or the op).
    logits = torch.randn(33, 80, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(33, 80, device=DEVICE)
    torch.manual_seed(6)
    soft = gumbel_sigmoid(logits.detach(), 0.7)
    torch.manual_seed(6)
    hard = gumbel_sigmoid(logits, 0.7, hard=True)
    hard.backward(grad_out)
    assert torch.equal(hard.detach(), (soft > 0.5).float())
    torch.testing.assert_close(logits.grad, grad_out * 0.7 * soft * (1 - soft), rtol=1e-5, atol=1e-7)


def test_compiled_public_call(backend):
    # fullgraph: the seed draw is traced, the kernel sits inside the custom op. Inductor draws the
    # seed from its own RNG stream, so check the sample's own properties, not eager equality.
    compiled = torch.compile(lambda x: gumbel_sigmoid(x, 0.9), fullgraph=True)
    logits = torch.randn(17, 81, device=DEVICE, requires_grad=True)
    out = compiled(logits)
    out.sum().backward()
    assert out.dtype == torch.float32 and ((out > 0) & (out < 1)).all()
    torch.testing.assert_close(logits.grad, 0.9 * out.detach() * (1 - out.detach()), rtol=1e-5, atol=1e-7)
    seed = _seed(8)
    compiled_op = torch.compile(lambda x: _gumbel_op(x, seed, 0.9, True), fullgraph=True)
    assert torch.equal(compiled_op(logits.detach()), _gumbel_op(logits.detach(), seed, 0.9, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, dtype):
    logits = torch.randn(3, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    seed = _seed(1234)
    for hard in (False, True):
        torch.library.opcheck(torch.ops.fastmlgan.gumbel_sigmoid, (logits, seed, 0.9, hard))
    grad_out = torch.randn(3, 5, device=DEVICE)
    soft = torch.rand(3, 5, device=DEVICE)
    for saved in (None, soft):
        torch.library.opcheck(
            torch.ops.fastmlgan.gumbel_sigmoid_backward, (grad_out, logits.detach(), seed, 0.9, saved)
        )


def test_bad_backend_value(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    with pytest.raises(ConfigError, match="FASTMLGAN_KERNELS"):
        gumbel_sigmoid(torch.zeros(2, 3))


def _captured_graph(fn, *args, dynamic=False):
    """The FX graphs dynamo hands its backend when it compiles ``fn`` (fullgraph)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=capture, fullgraph=True, dynamic=dynamic)(*args)
    return out, graphs


def _fastmlgan_ops(graphs) -> set[str]:
    return {str(n.target) for g in graphs for n in g.graph.nodes if "fastmlgan" in str(n.target)}


def test_compiled_torch_path_is_plain_ops_in_the_callers_graph(monkeypatch):
    # The torch path under torch.compile is traced into the caller's graph as ordinary ops, which
    # inductor can fuse with G's head and D's first layer; the Triton path is the opaque custom op.
    logits = torch.randn(6, 80, device=DEVICE)
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    for hard in (False, True):
        _, graphs = _captured_graph(lambda x, hard=hard: gumbel_sigmoid(x, 0.9, hard=hard), logits)
        assert len(graphs) == 1 and not _fastmlgan_ops(graphs)
        targets = {str(n.target) for n in graphs[0].graph.nodes}
        assert any("rand" in t for t in targets) and any("sigmoid" in t for t in targets), targets
    if TRITON_HERE:
        monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
        _, graphs = _captured_graph(lambda x: gumbel_sigmoid(x, 0.9), logits)
        assert {t.removesuffix(".default") for t in _fastmlgan_ops(graphs)} == {"fastmlgan.gumbel_sigmoid"}


def test_compiled_torch_path_takes_a_symbolic_batch_size(monkeypatch):
    # A compiled step whose last batch is smaller re-traces with a dynamic batch size;
    # torch.rand(..., generator=None) rejected that (torch 2.14), the torch path must not.
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")

    def sample(x):
        return gumbel_sigmoid(x, 0.9, hard=True)

    torch._dynamo.reset()
    compiled = torch.compile(sample, backend="eager", fullgraph=True, dynamic=True)
    for batch in (5, 9):
        out = compiled(torch.randn(batch, 80, device=DEVICE))
        assert out.shape == (batch, 80) and set(out.unique().tolist()) <= {0.0, 1.0}
