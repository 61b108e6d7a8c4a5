"""Which implementation a fastmlgan op runs, and the seeds its random kernels start from.

``FASTMLGAN_KERNELS=triton|torch`` forces a path; unset (or ``auto``) runs the Triton kernels on
CUDA tensors and the pure-torch reference on CPU tensors. It is read at every call, inside the
custom op, so a compiled graph follows it too.

Triton on CPU tensors runs through Triton's interpreter. Triton picks the interpreter when
``@triton.jit`` *decorates* a function, and ``triton.language``'s own jit functions (``tl.rand``,
``tl.sigmoid``, the reductions' combine functions) are decorated when ``triton`` is first
imported. So ``TRITON_INTERPRET=1`` must be in the environment before anything imports
``triton`` — torchvision and ``torch.compile`` do — and setting it later does not work; nor does
wrapping a compiled kernel in ``InterpretedFunction`` by hand (its first ``tl.rand`` call fails
with "Cannot call @triton.jit'd outside of the scope of a kernel"; measured on triton 3.8).
"""

from __future__ import annotations

import os

import torch

from fastmlgan.errors import ConfigError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # a CPU-only install without triton still runs the torch reference
    triton = None
    tl = None
    HAS_TRITON = False

ENV_VAR = "FASTMLGAN_KERNELS"
BACKENDS = ("auto", "triton", "torch")

# Seeds are drawn in [0, 2**62): Philox takes a 64-bit key, and a 31-bit seed would repeat
# (birthday bound) after ~65k draws, i.e. within one long run.
SEED_HIGH = 2**62


def kernel_backend() -> str:
    """The value of ``FASTMLGAN_KERNELS``: ``auto`` (unset), ``triton`` or ``torch``."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(f"{ENV_VAR} must be 'triton', 'torch' or unset (auto), got {value!r}")
    return value


def triton_interpreter_active() -> bool:
    """Whether Triton kernels can run on CPU tensors in this process (see the module docstring)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.rand, InterpretedFunction)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs its Triton kernels (True) or the torch reference."""
    backend = kernel_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and tensor.is_cuda
    if not HAS_TRITON:
        raise ConfigError(f"{ENV_VAR}=triton but triton is not installed; unset {ENV_VAR} or install triton")
    if not tensor.is_cuda and not triton_interpreter_active():
        raise ConfigError(
            f"{ENV_VAR}=triton on {tensor.device.type} tensors runs Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before triton is first imported; "
            f"set it when launching the process, or unset {ENV_VAR}"
        )
    return True


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 0-d int64 seed on ``device`` drawn from ``generator`` (or torch's default RNG).

    It stays a tensor so that nothing synchronises with the host (kernels load it on the device)
    and ``torch.compile`` traces the draw instead of breaking the graph on ``.item()``.
    Under ``torch.compile`` the draw uses inductor's RNG: still set by ``torch.manual_seed``, but a
    different stream from eager mode. A ``generator`` argument is not traceable by dynamo.
    """
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=gen_device, generator=generator)
    return seed.to(device, non_blocking=True)


def torch_generator(seed: torch.Tensor) -> torch.Generator:
    """A torch generator on ``seed``'s device started from it: the torch path's noise source.

    ``int(seed)`` syncs when the seed lives on a GPU; only the forced ``torch`` path on CUDA pays it.
    The CPU generator (mt19937) keeps only 32 bits of its seed, so the high word is folded in:
    on CPU two draws collide with probability 2⁻³² (the CUDA generator keeps all 64 bits).
    """
    value = int(seed)
    if seed.device.type == "cpu":
        value = (value ^ (value >> 32)) & 0xFFFFFFFF
    return torch.Generator(device=seed.device).manual_seed(value)
