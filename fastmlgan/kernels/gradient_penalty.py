"""The WGAN-GP gradient penalty of eq. (5), written first-order so the whole D loss compiles.

    L_gp = E[(‖∇_{y*} D(y*, z)‖₂ − 1)²],   y* = ε y + (1 − ε) ŷ,   ε ~ U(0, 1) per sample

The textbook penalty takes ∇_{y*} D with ``autograd.grad(create_graph=True)`` and then needs a
double backward, which ``torch.compile`` cannot compile. For the MLP discriminator of §4.1 the
input gradient is a product of matrices, so it is written here as ordinary forward ops (the
transposed-Jacobian chain, one row per sample):

    ∇_{y*} D = [ (…((w_outᵀ ⊙ s_L) W_L ⊙ s_{L−1}) W_{L−1} …) ⊙ s_1 ) W_1 ]_{label part} W_label

with s_k the LeakyReLU slope (1 or ``negative_slope``) at layer k's pre-activation, evaluated at
y*. s_k is piecewise constant in every input and parameter, so its derivative is zero almost
everywhere — exactly what double backward uses (``leaky_relu_backward`` differentiates to zero in
its input) — and the gradient of this penalty equals the textbook one for every parameter. The
penalty is then first order: ``loss.backward()`` and ``torch.compile(fullgraph=True)`` handle it.

Two registered ops carry the fused parts: ``fastmlgan::gp_interpolate`` (y* with ε drawn in-kernel
per row from a seed) and ``fastmlgan::gp_norm_penalty`` (mean((‖g_i‖ − 1)²), backward
``fastmlgan::gp_norm_penalty_backward``). The matrix chain stays in torch: those are matmuls, and
inductor already fuses the slope selects into their neighbours. ``gradient_penalty`` uses the ops
only where the Triton path was measured faster (``_dispatch``); elsewhere it runs their torch
references as plain ops, which ``torch.compile`` traces into the D step's graph.
"""

from __future__ import annotations

import torch
from torch import nn

from fastmlgan.kernels._dispatch import HAS_TRITON, choose_path, draw_seed, tl, torch_generator, triton, use_triton

# Rows per program of the row-wise kernels; columns are |S| (80 for COCO, 81 for NUS-WIDE).
BLOCK_ROWS = 16
MAX_BLOCK_COLS = 128


# ---------------------------------------------------------------------------------------------
# Pure-torch reference
# ---------------------------------------------------------------------------------------------


def interpolate_reference(real: torch.Tensor, fake: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """y* = ε y + (1 − ε) ŷ with one ε per row (shape (B,) or (B, 1)), computed in fp32."""
    eps = epsilon.reshape(-1, 1).float()
    out = eps * real.float() + (1.0 - eps) * fake.float()
    return out.to(torch.promote_types(real.dtype, fake.dtype))


def norm_penalty_reference(grad: torch.Tensor) -> torch.Tensor:
    """mean_i (‖g_i‖₂ − 1)² over the rows of ``grad``, in fp32."""
    return ((torch.linalg.vector_norm(grad.float(), dim=1) - 1.0) ** 2).mean()


def gradient_penalty_autograd(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    features: torch.Tensor | None,
    epsilon: torch.Tensor,
) -> torch.Tensor:
    """Eq. (5) the textbook way (Gulrajani et al. 2017): ``autograd.grad(create_graph=True)`` and a
    double backward. The reference for ``gradient_penalty``; it cannot be compiled."""
    interp = interpolate_reference(real, fake, epsilon)
    if not interp.requires_grad:
        interp.requires_grad_(True)
    scores = discriminator(interp, features)
    (grad,) = torch.autograd.grad(scores.sum(), interp, create_graph=True)
    return norm_penalty_reference(grad)


# ---------------------------------------------------------------------------------------------
# The explicit input gradient of the MLP discriminator
# ---------------------------------------------------------------------------------------------


def unwrap_discriminator(module: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers; its parameters are the wrapper's, so gradients reach them."""
    while True:
        if isinstance(getattr(module, "module", None), nn.Module):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def _body_layers(discriminator: nn.Module) -> list[nn.Module]:
    for name in ("label_proj", "body", "out"):
        if not hasattr(discriminator, name):
            raise TypeError(
                f"gradient_penalty needs the MLP Discriminator of fastmlgan.models (no .{name} on "
                f"{type(discriminator).__name__}); use gradient_penalty_autograd for other critics"
            )
    layers = list(discriminator.body)
    for layer in layers:
        if not isinstance(layer, (nn.Linear, nn.LeakyReLU, nn.ReLU)):
            raise TypeError(
                f"gradient_penalty walks Linear/LeakyReLU bodies, found {type(layer).__name__}; "
                "use gradient_penalty_autograd for other critics"
            )
    return layers


def discriminator_input_gradient(
    discriminator: nn.Module, labels: torch.Tensor, features: torch.Tensor | None
) -> torch.Tensor:
    """∇_labels D(labels, features), one row per sample, as first-order ops in D's weights.

    Differentiable in D's weights (not its biases or ``feature_proj``, which move the gradient
    only through the slope masks, whose derivative is zero). Not differentiable in ``labels``
    or ``features`` for the same reason.
    """
    d = unwrap_discriminator(discriminator)
    layers = _body_layers(d)
    # Forward pass at y* for the slope masks only: nothing flows back through a mask.
    positive: list[torch.Tensor | None] = []
    with torch.no_grad():
        h = d.label_proj(labels)
        if d.feature_proj is not None:
            if features is None:
                raise ValueError("a conditional Discriminator needs image features")
            h = torch.cat([h, d.feature_proj(features)], dim=-1)
        for layer in layers:
            positive.append(h > 0 if not isinstance(layer, nn.Linear) else None)
            h = layer(h)
    # The chain, from the output back to the label input. A select rather than a multiply by a
    # 1/slope mask: it is the op autograd's leaky_relu_backward runs, so the values match it.
    grad = d.out.weight.expand(labels.shape[0], -1)
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        if isinstance(layer, nn.Linear):
            weight = layer.weight
            if index == 0 and d.feature_proj is not None:
                # Only the label half of the first layer's input leads back to y*.
                weight = weight[:, : d.label_proj.out_features]
            grad = grad @ weight
        else:
            slope = layer.negative_slope if isinstance(layer, nn.LeakyReLU) else 0.0
            grad = torch.where(positive[index], grad, grad * slope)
    if d.feature_proj is not None and not (layers and isinstance(layers[0], nn.Linear)):
        grad = grad[:, : d.label_proj.out_features]
    return grad @ d.label_proj.weight


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _gp_interpolate_fwd_kernel(
        real_ptr,
        fake_ptr,
        out_ptr,
        seed_ptr,
        num_rows,
        num_cols,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
        COL_BLOCKS: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        # One ε per sample (eq. 5): the Philox counter is the row index.
        eps = tl.rand(tl.load(seed_ptr), rows)[:, None]
        for col_block in range(COL_BLOCKS):
            cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
            offsets = rows[:, None] * num_cols + cols[None, :]
            real = tl.load(real_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            fake = tl.load(fake_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            out = eps * real + (1.0 - eps) * fake
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_norms(
        grad_ptr, rows, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, COL_BLOCKS: tl.constexpr
    ):
        sum_sq = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for col_block in range(COL_BLOCKS):
            cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
            g = tl.load(grad_ptr + rows[:, None] * num_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sum_sq += tl.sum(g * g, axis=1)
        # sqrt_rn: correctly rounded like torch (issue 12); tl.sqrt is sqrt.approx.ftz.f32 on NVIDIA GPUs.
        return tl.sqrt_rn(sum_sq)

    @triton.jit
    def _gp_norm_penalty_fwd_kernel(
        grad_ptr,
        out_ptr,
        num_rows,
        num_cols,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
        COL_BLOCKS: tl.constexpr,
        ROW_BLOCKS: tl.constexpr,
    ):
        # One program walks all rows: the D batch is small (64–256 rows of |S| ≈ 80), and a fixed
        # summation order keeps the penalty deterministic (no atomics).
        total = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for row_block in range(ROW_BLOCKS):
            rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            deviation = _row_norms(grad_ptr, rows, num_rows, num_cols, BLOCK_ROWS, BLOCK_COLS, COL_BLOCKS) - 1.0
            total += tl.where(rows < num_rows, deviation * deviation, 0.0)
        tl.store(out_ptr, tl.sum(total, axis=0) / num_rows)

    @triton.jit
    def _gp_norm_penalty_bwd_kernel(
        grad_out_ptr,
        grad_ptr,
        grad_grad_ptr,
        num_rows,
        num_cols,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
        COL_BLOCKS: tl.constexpr,
    ):
        # d/dg_i mean_j (‖g_j‖ − 1)² = 2 (‖g_i‖ − 1) g_i / (B ‖g_i‖), and 0 at g_i = 0 as torch's
        # norm backward gives.
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        norms = _row_norms(grad_ptr, rows, num_rows, num_cols, BLOCK_ROWS, BLOCK_COLS, COL_BLOCKS)
        grad_out = tl.load(grad_out_ptr).to(tl.float32)
        safe = tl.where(norms > 0.0, norms, 1.0)
        scale = tl.where(norms > 0.0, grad_out * 2.0 * (norms - 1.0) / (safe * num_rows), 0.0)[:, None]
        for col_block in range(COL_BLOCKS):
            cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
            offsets = rows[:, None] * num_cols + cols[None, :]
            g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_grad_ptr + offsets, (scale * g).to(grad_grad_ptr.dtype.element_ty), mask=mask)


def _block_cols(num_cols: int) -> int:
    return min(triton.next_power_of_2(max(num_cols, 1)), MAX_BLOCK_COLS)


def _blocks(num_cols: int, num_rows: int | None = None) -> dict[str, int]:
    """The kernels' loop trip counts, as constexprs. Triton 3.6's interpreter hands a scalar
    argument to the kernel as a one-element NumPy array, and ``range(0, num_cols, BLOCK)`` over it
    fails under NumPy 2.5 ("only 0-dimensional arrays can be converted to Python scalars": 27 kernel
    tests, torch 2.11 / Triton 3.6 / Python 3.12). A constexpr count is a Python int everywhere; on
    a GPU it specialises the kernel per count: 1 column block for |S| <= 128, one row count per D
    batch size."""
    block_cols = _block_cols(num_cols)
    out = {"BLOCK_COLS": block_cols, "COL_BLOCKS": triton.cdiv(num_cols, block_cols)}
    if num_rows is not None:
        out["ROW_BLOCKS"] = triton.cdiv(num_rows, BLOCK_ROWS)
    return out


def _check_rows(name: str, tensor: torch.Tensor) -> None:
    torch._check(tensor.dim() == 2, lambda: f"{name} must be (batch, labels), got shape {tuple(tensor.shape)}")


# ---------------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastmlgan::gp_interpolate", mutates_args=())
def _gp_interpolate_op(real: torch.Tensor, fake: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    _check_rows("real", real)
    torch._check(real.shape == fake.shape, lambda: f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    if use_triton(real):
        real, fake = real.contiguous(), fake.contiguous()
        out = torch.empty(real.shape, dtype=torch.promote_types(real.dtype, fake.dtype), device=real.device)
        num_rows, num_cols = real.shape
        if out.numel():
            _gp_interpolate_fwd_kernel[(triton.cdiv(num_rows, BLOCK_ROWS),)](
                real, fake, out, seed, num_rows, num_cols, BLOCK_ROWS=BLOCK_ROWS, **_blocks(num_cols)
            )
        return out
    epsilon = torch.rand(real.shape[0], dtype=torch.float32, device=real.device, generator=torch_generator(seed))
    return interpolate_reference(real, fake, epsilon).contiguous()


@_gp_interpolate_op.register_fake
def _(real, fake, seed):
    return real.new_empty(real.shape, dtype=torch.promote_types(real.dtype, fake.dtype))


# No autograd formula on purpose: y* only sets the slope masks of the penalty (its gradient in y
# and ŷ is zero almost everywhere, see the module docstring), so ``gradient_penalty`` detaches it.
# A caller that backpropagates through the op gets torch's "no autograd formula was registered"
# error, never a silent wrong gradient.


@torch.library.custom_op("fastmlgan::gp_norm_penalty", mutates_args=())
def _gp_norm_penalty_op(grad: torch.Tensor) -> torch.Tensor:
    _check_rows("grad", grad)
    if use_triton(grad):
        grad = grad.contiguous()
        out = torch.empty((), dtype=torch.float32, device=grad.device)
        num_rows, num_cols = grad.shape
        _gp_norm_penalty_fwd_kernel[(1,)](
            grad, out, num_rows, num_cols, BLOCK_ROWS=BLOCK_ROWS, **_blocks(num_cols, num_rows)
        )
        return out
    return norm_penalty_reference(grad)


@_gp_norm_penalty_op.register_fake
def _(grad):
    return grad.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmlgan::gp_norm_penalty_backward", mutates_args=())
def _gp_norm_penalty_backward_op(grad_out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    _check_rows("grad", grad)
    grad = grad.contiguous()
    if use_triton(grad):
        grad_grad = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        num_rows, num_cols = grad.shape
        if grad.numel():
            _gp_norm_penalty_bwd_kernel[(triton.cdiv(num_rows, BLOCK_ROWS),)](
                grad_out, grad, grad_grad, num_rows, num_cols, BLOCK_ROWS=BLOCK_ROWS, **_blocks(num_cols)
            )
        return grad_grad
    g = grad.float()
    norms = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    scale = torch.where(norms > 0, 2.0 * (norms - 1.0) / (norms.clamp_min(1e-30) * grad.shape[0]), 0.0)
    return (grad_out.float() * scale * g).to(grad.dtype)


@_gp_norm_penalty_backward_op.register_fake
def _(grad_out, grad):
    return grad.new_empty(grad.shape)


def _norm_penalty_setup_context(ctx, inputs, output):
    (grad,) = inputs
    ctx.save_for_backward(grad)


def _norm_penalty_backward(ctx, grad_out):
    (grad,) = ctx.saved_tensors
    return torch.ops.fastmlgan.gp_norm_penalty_backward(grad_out, grad)


_gp_norm_penalty_op.register_autograd(_norm_penalty_backward, setup_context=_norm_penalty_setup_context)


# ---------------------------------------------------------------------------------------------
# Public calls
# ---------------------------------------------------------------------------------------------


def interpolation_epsilon(seed: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The per-sample ε (B,) that ``interpolate`` draws at ``seed``, to feed the textbook penalty.

    Read off y* itself: with y = 1 and ŷ = 0, y* = ε · 1 + (1 − ε) · 0 = ε exactly in fp32.
    """
    ones = torch.ones(batch_size, 1, dtype=torch.float32, device=seed.device)
    return interpolate(ones, torch.zeros_like(ones), seed)[:, 0]


def interpolate(real: torch.Tensor, fake: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """y* = ε y + (1 − ε) ŷ, ε ~ U(0, 1) per row drawn from ``seed`` (fused on the Triton path).

    Not differentiable (see ``fastmlgan::gp_interpolate``): the penalty uses y* only for its masks.
    """
    return torch.ops.fastmlgan.gp_interpolate(real, fake, seed)


def norm_penalty(grad: torch.Tensor) -> torch.Tensor:
    """mean_i (‖g_i‖₂ − 1)² (fused on the Triton path), fp32 scalar."""
    return torch.ops.fastmlgan.gp_norm_penalty(grad)


def gradient_penalty(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    features: torch.Tensor | None,
    *,
    epsilon: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """E[(‖∇_{y*} D(y*, z)‖₂ − 1)²] of eq. (5), without λ; first order, compiles with fullgraph.

    ``real`` y and ``fake`` ŷ are (B, |S|) label sets, ``features`` z the image features (None for
    an unconditional D). ε is drawn per sample from ``generator`` (or torch's RNG) unless
    ``epsilon`` (B,) fixes it. ``discriminator`` may be wrapped by DDP or ``torch.compile``; its
    layers are read through the wrappers. Under DDP, add this to the D terms of eq. (4), which call
    the wrapper: DDP's all-reduce is armed by the wrapper's forward, which this penalty never calls,
    so a penalty-only backward would leave each rank with its own gradients.

    The penalty does not depend on ŷ, y or z except through the slope masks, so its gradient in
    them is exactly zero; they are left out of the graph (``.grad`` stays None where double
    backward would write zeros).
    """
    if choose_path("gradient_penalty", real) == "triton":
        if epsilon is None:
            labels = interpolate(real, fake, draw_seed(real.device, generator))
        else:
            labels = interpolate_reference(real, fake, epsilon)
        return norm_penalty(discriminator_input_gradient(discriminator, labels.detach(), features))
    if epsilon is None:
        epsilon = _uniform_per_row(real, generator)
    labels = interpolate_reference(real, fake, epsilon)
    return norm_penalty_reference(discriminator_input_gradient(discriminator, labels.detach(), features))


def _uniform_per_row(rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """ε ~ U(0, 1), one per row of ``rows``, fp32, from ``generator`` or torch's (inductor's) RNG."""
    if generator is None:
        # rand_like: a compiled step with a smaller last batch traces with a symbolic batch size.
        return torch.rand_like(rows[:, 0], dtype=torch.float32)
    eps = torch.rand(rows.shape[0], device=generator.device, dtype=torch.float32, generator=generator)
    return eps.to(rows.device)
