"""Gumbel-sigmoid sampling (§3.2): a relaxed Bernoulli sample of each label.

    ŷ = σ(β · (ℓ + log u − log(1 − u))),   u ~ U(0, 1),   β = inverse temperature (0.9, §4.1)

``log u − log(1 − u)`` is logistic noise, the difference of two Gumbel variables. The hard
sample 1[ŷ > 0.5] = 1[ℓ + noise > 0] is 1 with probability σ(ℓ) whatever β; β only sets how
sharp the relaxed sample is. Computed in fp32 whatever the logits' dtype.

This file holds the pure-torch reference, the Triton kernels, and the registered op
``fastmlgan::gumbel_sigmoid`` (its backward is ``fastmlgan::gumbel_sigmoid_backward``). The
kernels draw u in-kernel with Philox from a seed and never store it. The backward needs only
dŷ/dℓ = β ŷ (1 − ŷ) of the soft sample: it reuses the soft output when that is what the forward
returned, and regenerates the noise from the same seed and offsets behind a hard sample.

``gumbel_sigmoid`` calls the op only where the Triton path was measured faster (``_dispatch``).
Elsewhere it is the reference as plain torch ops, which ``torch.compile`` traces into the caller's
graph: inductor then fuses the noise, the sigmoid and the straight-through into G's head and into
D's first layer, which the custom op would hide from it (issue 9, measured in bench/kernels.py).
"""

from __future__ import annotations

import torch

from fastmlgan.kernels._dispatch import HAS_TRITON, choose_path, draw_seed, tl, torch_generator, triton, use_triton

# u is kept in [EPS, 1 - EPS] so both logs stay finite in fp32 (1 - 1e-6 is representable; the
# noise is then bounded by |log(1e-6)| ≈ 13.8, a truncation of probability 2e-6 per element).
EPS = 1e-6
# Elements per program: the op is memory bound and tiny (B × |S| ≈ 20k–330k elements).
BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Pure-torch reference
# ---------------------------------------------------------------------------------------------


def logistic_noise(shape, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """log u − log(1 − u), u ~ U(0, 1) clamped to [EPS, 1 − EPS], fp32, from ``generator`` or
    torch's RNG (inductor's under ``torch.compile``)."""
    if generator is None:
        # No ``generator=None`` keyword: with it, dynamo rejects symbolic sizes (torch 2.14), and
        # a compiled step whose last batch is smaller traces with dynamic shapes.
        u = torch.rand(shape, device=device, dtype=torch.float32)
    else:
        u = torch.rand(shape, device=generator.device, dtype=torch.float32, generator=generator).to(device)
    u = u.clamp(EPS, 1.0 - EPS)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid_reference(
    logits: torch.Tensor,
    noise: torch.Tensor,
    inv_temperature: float = 0.9,
    hard: bool = False,
) -> torch.Tensor:
    """Pure-torch Gumbel sigmoid given the logistic noise; fp32 out."""
    soft = torch.sigmoid(inv_temperature * (logits.float() + noise))
    if not hard:
        return soft
    # Straight-through: the forward value is the hard sample, the gradient that of the soft one.
    hard_sample = (soft > 0.5).to(soft.dtype)
    return hard_sample + (soft - soft.detach())


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _logistic_noise(seed, offsets, EPS: tl.constexpr):
        # Same clamp as the reference; log(1 - u) instead of log1p(-u) (tl has no log1p): for
        # u ≤ 0.5 the two differ by < 1e-7 absolute, for u > 0.5, 1 - u is exact in fp32.
        u = tl.rand(seed, offsets)
        u = tl.minimum(tl.maximum(u, EPS), 1.0 - EPS)
        return tl.log(u) - tl.log(1.0 - u)

    @triton.jit
    def _soft_sample(logits_ptr, seed_ptr, offsets, mask, inv_temperature, EPS: tl.constexpr):
        logits = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        seed = tl.load(seed_ptr)
        return tl.sigmoid(inv_temperature * (logits + _logistic_noise(seed, offsets, EPS)))

    @triton.jit
    def _gumbel_sigmoid_fwd_kernel(
        logits_ptr,
        out_ptr,
        seed_ptr,
        num_elements,
        inv_temperature,
        HARD: tl.constexpr,
        EPS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < num_elements
        soft = _soft_sample(logits_ptr, seed_ptr, offsets, mask, inv_temperature, EPS)
        if HARD:
            out = tl.where(soft > 0.5, 1.0, 0.0)
        else:
            out = soft
        tl.store(out_ptr + offsets, out, mask=mask)

    @triton.jit
    def _gumbel_sigmoid_bwd_kernel(
        grad_out_ptr,
        logits_ptr,
        seed_ptr,
        soft_ptr,
        grad_logits_ptr,
        num_elements,
        inv_temperature,
        FROM_SOFT: tl.constexpr,
        EPS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Soft and straight-through hard samples share this gradient: that of the soft sample,
        # read back (FROM_SOFT) or regenerated from the seed.
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < num_elements
        if FROM_SOFT:
            soft = tl.load(soft_ptr + offsets, mask=mask, other=0.0)
        else:
            soft = _soft_sample(logits_ptr, seed_ptr, offsets, mask, inv_temperature, EPS)
        grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_logits = grad_out * inv_temperature * soft * (1.0 - soft)
        tl.store(grad_logits_ptr + offsets, grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _grid(num_elements: int) -> tuple[int]:
    return (triton.cdiv(num_elements, BLOCK),)


def _check_seed(seed: torch.Tensor, device: torch.device) -> None:
    torch._check(seed.dtype == torch.int64 and seed.numel() == 1, lambda: "seed must be a one-element int64 tensor")
    torch._check(seed.device == device, lambda: f"seed on {seed.device}, logits on {device}")


# ---------------------------------------------------------------------------------------------
# The registered op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastmlgan::gumbel_sigmoid", mutates_args=())
def _gumbel_sigmoid_op(logits: torch.Tensor, seed: torch.Tensor, inv_temperature: float, hard: bool) -> torch.Tensor:
    _check_seed(seed, logits.device)
    logits = logits.contiguous()
    if use_triton(logits):
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        if logits.numel():
            _gumbel_sigmoid_fwd_kernel[_grid(logits.numel())](
                logits, out, seed, logits.numel(), inv_temperature, HARD=hard, EPS=EPS, BLOCK=BLOCK
            )
        return out
    soft = gumbel_sigmoid_reference(
        logits, logistic_noise(logits.shape, logits.device, torch_generator(seed)), inv_temperature
    )
    return (soft > 0.5).float() if hard else soft


@_gumbel_sigmoid_op.register_fake
def _(logits, seed, inv_temperature, hard):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.custom_op("fastmlgan::gumbel_sigmoid_backward", mutates_args=())
def _gumbel_sigmoid_backward_op(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    seed: torch.Tensor,
    inv_temperature: float,
    soft: torch.Tensor | None,
) -> torch.Tensor:
    """β ŷ (1 − ŷ) · grad_out in the logits' dtype; ŷ is ``soft`` if given, else regenerated."""
    _check_seed(seed, logits.device)
    logits = logits.contiguous()
    grad_out = grad_out.contiguous()
    soft = soft.contiguous() if soft is not None else None
    if use_triton(logits):
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if logits.numel():
            # Without a saved soft sample the kernel never reads soft_ptr: any pointer will do.
            soft_or_unused = soft if soft is not None else grad_out
            _gumbel_sigmoid_bwd_kernel[_grid(logits.numel())](
                grad_out,
                logits,
                seed,
                soft_or_unused,
                grad_logits,
                logits.numel(),
                inv_temperature,
                FROM_SOFT=soft is not None,
                EPS=EPS,
                BLOCK=BLOCK,
            )
        return grad_logits
    if soft is None:
        soft = gumbel_sigmoid_reference(
            logits, logistic_noise(logits.shape, logits.device, torch_generator(seed)), inv_temperature
        )
    return (grad_out.float() * inv_temperature * soft * (1.0 - soft)).to(logits.dtype)


@_gumbel_sigmoid_backward_op.register_fake
def _(grad_out, logits, seed, inv_temperature, soft):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, seed, inv_temperature, hard = inputs
    # A soft output is ŷ itself: keep it (B × |S| fp32) and skip regenerating the noise.
    ctx.save_for_backward(logits, seed, None if hard else output)
    ctx.inv_temperature = inv_temperature


def _backward(ctx, grad_out):
    logits, seed, soft = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.fastmlgan.gumbel_sigmoid_backward(grad_out, logits, seed, ctx.inv_temperature, soft)
    return grad_logits, None, None, None


_gumbel_sigmoid_op.register_autograd(_backward, setup_context=_setup_context)


def gumbel_sigmoid(
    logits: torch.Tensor,
    inv_temperature: float = 0.9,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample a relaxed multi-hot label set from per-label logits (any shape, any float dtype).

    Returns fp32. The noise follows ``torch.manual_seed`` or ``generator``: on the Triton path one
    seed is drawn from it per call and the kernel expands it with Philox; on the torch path the
    uniforms are drawn from it directly. With ``hard=True`` the value is 1[ŷ > 0.5] and the
    gradient that of the soft sample. Under ``torch.compile`` pass no ``generator`` (dynamo cannot
    trace one); the noise then comes from inductor's RNG, still set by ``torch.manual_seed``.
    """
    if choose_path("gumbel_sigmoid", logits) == "triton":
        seed = draw_seed(logits.device, generator)
        return torch.ops.fastmlgan.gumbel_sigmoid(logits, seed, float(inv_temperature), bool(hard))
    noise = logistic_noise(logits.shape, logits.device, generator)
    return gumbel_sigmoid_reference(logits, noise, float(inv_temperature), bool(hard))
