"""Test-only views into the kernels: the noise the Gumbel op adds at a seed.

Kept out of the package (issue 12): nothing but the tests needs them.
"""

from __future__ import annotations

import torch

from fastmlgan.kernels._dispatch import HAS_TRITON, tl, torch_generator, triton, use_triton
from fastmlgan.kernels.gumbel_sigmoid import BLOCK, EPS, logistic_noise

if HAS_TRITON:
    from fastmlgan.kernels.gumbel_sigmoid import _logistic_noise

    @triton.jit
    def _logistic_noise_kernel(out_ptr, seed_ptr, num_elements, EPS: tl.constexpr, BLOCK: tl.constexpr):
        # The noise the op's kernels add at the same seed and offsets.
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr)
        tl.store(out_ptr + offsets, _logistic_noise(seed, offsets, EPS), mask=offsets < num_elements)


def seeded_logistic_noise(seed: torch.Tensor, shape, device) -> torch.Tensor:
    """The logistic noise that ``fastmlgan::gumbel_sigmoid`` adds at ``seed`` (fp32, contiguous).

    Follows the same backend choice as the op (``FASTMLGAN_KERNELS``), so
    ``gumbel_sigmoid_reference(logits, noise, …)`` must equal the op's output elementwise.
    """
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if use_triton(out):
        if out.numel():
            _logistic_noise_kernel[(triton.cdiv(out.numel(), BLOCK),)](out, seed, out.numel(), EPS=EPS, BLOCK=BLOCK)
        return out
    return logistic_noise(shape, device, torch_generator(seed))


if HAS_TRITON:
    from fastmlgan.kernels.gradient_penalty import _row_norms

    @triton.jit
    def _row_norms_kernel(
        grad_ptr, out_ptr, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, COL_BLOCKS: tl.constexpr
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        norms = _row_norms(grad_ptr, rows, num_rows, num_cols, BLOCK_ROWS, BLOCK_COLS, COL_BLOCKS)
        tl.store(out_ptr + rows, norms, mask=rows < num_rows)


def triton_row_norms(grad: torch.Tensor) -> torch.Tensor:
    """‖g_i‖₂ per row as the penalty kernels compute it (their ``_row_norms``), fp32."""
    from fastmlgan.kernels.gradient_penalty import BLOCK_ROWS, _blocks

    grad = grad.contiguous()
    num_rows, num_cols = grad.shape
    out = torch.empty(num_rows, dtype=torch.float32, device=grad.device)
    _row_norms_kernel[(triton.cdiv(num_rows, BLOCK_ROWS),)](
        grad, out, num_rows, num_cols, BLOCK_ROWS=BLOCK_ROWS, **_blocks(num_cols)
    )
    return out


def penalty_epsilon(batch_size: int, generator_seed: int, device) -> torch.Tensor:
    """The ε (B,) that ``gradient_penalty(..., generator=torch.Generator(device).manual_seed(s))``
    draws: the seed-then-Philox ε of ``fastmlgan::gp_interpolate`` on the Triton path, the
    generator's own uniforms on the torch path."""
    from fastmlgan.kernels._dispatch import choose_path, draw_seed
    from fastmlgan.kernels.gradient_penalty import interpolation_epsilon

    generator = torch.Generator(device).manual_seed(generator_seed)
    probe = torch.empty(batch_size, 1, device=device)
    if choose_path("gradient_penalty", probe) == "triton":
        return interpolation_epsilon(draw_seed(torch.device(device), generator), batch_size)
    return torch.rand(batch_size, dtype=torch.float32, device=device, generator=generator)
