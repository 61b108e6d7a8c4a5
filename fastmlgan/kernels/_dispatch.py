"""Which implementation a fastmlgan op runs, and the seeds its random kernels start from.

Each op (``gumbel_sigmoid``, ``gradient_penalty``) has two paths:

* ``triton``: the registered custom op, whose kernels run fused (Triton on CUDA tensors);
* ``torch``: the pure-torch reference as plain ops. Eagerly they run one by one; under
  ``torch.compile`` they are traced into the caller's graph, so inductor fuses them with their
  neighbours (a custom op is opaque to inductor and always runs on its own).

``FASTMLGAN_KERNELS=triton|torch`` forces a path. Unset (or ``auto``) takes, per op, device type
and mode (eager or compiled), the path measured fastest: ``dispatch.json`` beside this file,
written by ``bench/kernels.py --write-dispatch`` from a results file in ``bench/results/`` (the
file, device, versions and date are inside it). It is read once, at import. A device type or mode
it has no measurement for runs the torch reference: a kernel is used only where it was measured to
win. The choice is made when the op is called, or when ``torch.compile`` traces it. Dynamo guards
on the variable's value when it is set, so changing it recompiles; but a variable that was unset
at the first trace and set later goes unnoticed (torch 2.14): set it when launching the process.

Triton on CPU tensors runs through Triton's interpreter. Triton picks the interpreter when
``@triton.jit`` *decorates* a function, and ``triton.language``'s own jit functions (``tl.rand``,
``tl.sigmoid``, the reductions' combine functions) are decorated when ``triton`` is first
imported. So ``TRITON_INTERPRET=1`` must be in the environment before anything imports
``triton`` — torchvision and ``torch.compile`` do — and setting it later does not work; nor does
wrapping a compiled kernel in ``InterpretedFunction`` by hand (its first ``tl.rand`` call fails
with "Cannot call @triton.jit'd outside of the scope of a kernel"; measured on triton 3.8).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
PATHS = ("triton", "torch")
OPS = ("gumbel_sigmoid", "gradient_penalty")
MODES = ("eager", "compiled")
DISPATCH_TABLE = Path(__file__).with_name("dispatch.json")

# Seeds are drawn in [0, 2**62): Philox takes a 64-bit key, and a 31-bit seed would repeat
# (birthday bound) after ~65k draws, i.e. within one long run.
SEED_HIGH = 2**62


def kernel_backend() -> str:
    """The value of ``FASTMLGAN_KERNELS``: ``auto`` (unset), ``triton`` or ``torch``."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(f"{ENV_VAR} must be 'triton', 'torch' or unset (auto), got {value!r}")
    return value


def read_dispatch_table(path: Path = DISPATCH_TABLE) -> dict[str, str]:
    """``{"<device type>/<op>/<mode>": "triton" | "torch"}`` from a table written by
    ``bench/kernels.py --write-dispatch``; raises ``ConfigError`` naming the file when it is broken."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        paths = {}
        for device_type, entry in table["devices"].items():
            for op, modes in entry["ops"].items():
                for mode, choice in modes.items():
                    if op not in OPS or mode not in MODES or choice["path"] not in PATHS:
                        raise ValueError(f"unknown op, mode or path at devices.{device_type}.ops.{op}.{mode}")
                    paths[f"{device_type}/{op}/{mode}"] = choice["path"]
        return paths
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{path}: cannot read the kernel dispatch table ({exc}); regenerate it with "
            f"`python bench/kernels.py --write-dispatch RESULTS.json`, or set {ENV_VAR}=torch|triton"
        ) from exc


# Read once at import; an unreadable table is reported by the first ``auto`` choice, so that a
# forced FASTMLGAN_KERNELS still works without it.
try:
    _AUTO_PATHS: dict[str, str] = read_dispatch_table()
    _TABLE_ERROR: ConfigError | None = None
except ConfigError as _exc:
    _AUTO_PATHS, _TABLE_ERROR = {}, _exc


def auto_path(op: str, device_type: str, mode: str) -> str:
    """The path ``auto`` takes for ``op`` on ``device_type`` in ``mode`` (eager or compiled),
    before checking that Triton can run: the table's choice, ``torch`` where it has none."""
    if _TABLE_ERROR is not None:
        raise _TABLE_ERROR
    return _AUTO_PATHS.get(f"{device_type}/{op}/{mode}", "torch")


def choose_path(op: str, tensor: torch.Tensor) -> str:
    """``"triton"`` (call the custom op) or ``"torch"`` (plain reference ops) for ``op`` on ``tensor``."""
    backend = kernel_backend()
    if backend == "torch":
        return "torch"
    if backend == "triton":
        _check_triton_runs_on(tensor)
        return "triton"
    mode = "compiled" if torch.compiler.is_compiling() else "eager"
    path = auto_path(op, tensor.device.type, mode)
    if path == "triton" and not (HAS_TRITON and (tensor.is_cuda or triton_interpreter_active())):
        return "torch"
    return path


def triton_interpreter_active() -> bool:
    """Whether Triton kernels can run on CPU tensors in this process (see the module docstring)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.rand, InterpretedFunction)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a custom op called on ``tensor`` runs its Triton kernels (True) or its torch
    implementation: the forced backend, else Triton on CUDA tensors when triton is installed."""
    backend = kernel_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and tensor.is_cuda
    _check_triton_runs_on(tensor)
    return True


def _check_triton_runs_on(tensor: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise ConfigError(f"{ENV_VAR}=triton but triton is not installed; unset {ENV_VAR} or install triton")
    if not tensor.is_cuda and not triton_interpreter_active():
        raise ConfigError(
            f"{ENV_VAR}=triton on {tensor.device.type} tensors runs Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before triton is first imported; "
            f"set it when launching the process, or unset {ENV_VAR}"
        )


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
