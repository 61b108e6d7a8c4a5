"""pytest-benchmark cases for bench/kernels.py, small and on CPU.

    pytest tests/unit/kernels/test_bench_kernels.py                 # run them
    pytest -m "not benchmark" ...  /  --benchmark-skip  # leave them out

Every case is marked ``benchmark`` with a group, so a plain test run can deselect them. Before
timing, each compiled variant is checked against eager mode: same loss, same gradients. Triton
variants are CUDA-only (the CPU interpreter's timings mean nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import kernels as bench  # noqa: E402  (bench/kernels.py)

from fastmlgan.kernels import _dispatch  # noqa: E402
from fastmlgan.kernels.gradient_penalty import interpolation_epsilon  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = DEVICE == "cuda" and _dispatch.HAS_TRITON
GUMBEL_SHAPE = (256, 80)
if DEVICE == "cpu":
    bench.quiet_compile_workers()
    # One thread: on a shared CPU, two OpenMP threads stall ~16 ms per parallel region whenever a
    # neighbour holds the other core (see bench/kernels.py --threads).
    torch.set_num_threads(1)
D_BATCH = 64


@pytest.fixture
def backend(monkeypatch):
    def set_backend(value):
        if value is None:
            monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(_dispatch.ENV_VAR, value)

    return set_backend


@pytest.mark.benchmark(group="gumbel_sigmoid fwd+bwd 256x80")
@pytest.mark.parametrize("variant", list(bench.gumbel_variants(DEVICE, TRITON)))
def test_gumbel_sigmoid(benchmark, backend, variant):
    env, sample, _, _ = bench.gumbel_variants(DEVICE, TRITON)[variant]
    backend(env)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(GUMBEL_SHAPE, generator=gen).to(DEVICE).requires_grad_(True)
    grad_out = torch.randn(GUMBEL_SHAPE, generator=gen).to(DEVICE)
    # Every variant is a Gumbel-sigmoid sample: the same gradient law dŷ/dℓ = β ŷ (1 − ŷ) holds.
    out = sample(logits)
    out.backward(grad_out)
    expected = grad_out * bench.INV_TEMPERATURE * out.detach() * (1 - out.detach())
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)
    benchmark.pedantic(bench.gumbel_step(sample, logits, grad_out), rounds=20, warmup_rounds=3)


@pytest.mark.benchmark(group=f"head+BCE+gumbel+D input {bench.FUSED_BATCH}x{bench.NUM_LABELS}")
@pytest.mark.parametrize("variant", list(bench.fused_variants(TRITON)))
def test_fused_gumbel(benchmark, backend, variant):
    env, fn, _, _ = bench.fused_variants(TRITON)[variant]
    backend(env)
    step = bench.fused_step(fn, DEVICE)
    # The variants draw different noise (eager RNG, inductor RNG, Philox), so only a finite loss is
    # checked here; tests/unit/kernels/test_gumbel_sigmoid.py tests each sampler's distribution.
    loss = step()
    assert torch.isfinite(loss)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)


@pytest.mark.benchmark(group=f"D loss fwd+bwd B={D_BATCH}")
@pytest.mark.parametrize("variant", list(bench.d_step_variants(TRITON)))
def test_d_step(benchmark, backend, variant):
    (env, loss_fn, _, _), random_input = bench.d_step_variants(TRITON)[variant]
    backend(env)
    d = bench.build_discriminator(DEVICE)
    batch = bench.d_batch(D_BATCH, DEVICE)
    step = bench.d_step(loss_fn, d, batch, random_input)
    loss = step()
    grads = [p.grad.clone() for p in d.parameters()]
    # The eager textbook loss (double backward) at the same ε, and its gradients.
    epsilon = interpolation_epsilon(batch["seed"], D_BATCH)
    eager_loss = bench.d_loss_textbook(d, batch["real"], batch["fake"], batch["mismatched"], batch["features"], epsilon)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for p in d.parameters():
        p.grad = None
    eager_loss.backward()
    for got, param in zip(grads, d.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
