"""Benchmark of the fused kernels against the plain alternatives, in one run.

    python bench/kernels.py [--device cpu|cuda] [--batch 64 128 256] [--repeats 20] [--quick] [--out PATH]
                            [--threads N]

Two cases, each timed as forward + backward, median over ``--repeats`` after warm-up (compilation
happens in the warm-up, outside the timed region, and is reported separately):

* Gumbel sigmoid (§3.2) at 256×80, 1024×80, 4096×81: the Triton op, the eager torch chain
  (``logistic_noise`` + ``gumbel_sigmoid_reference``), ``torch.compile`` of that chain, and the
  registered op on its torch path.
* The D loss of eq. (4) with λ·L_gp (eq. 5) and its backward (no optimiser step, which is the
  same for every variant), 80 labels, 2048-d features, the default D (256/512/8 layers):
  eager with the textbook double backward, eager first-order, ``torch.compile(fullgraph=True)``
  of the first-order loss in pure torch, the same with the fastmlgan ops on their torch path,
  and with the ops on the Triton path.

On CUDA the timer is ``triton.testing.do_bench`` (median); on CPU a perf_counter loop. On CPU the
Triton rows are skipped: they would run Triton's interpreter, whose timings mean nothing.
Results go to a table on stdout and to JSON (``--out``, default bench/results/kernels-<device>.json)
with the device, versions, git revision and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fastmlgan.kernels import _dispatch  # noqa: E402
from fastmlgan.kernels.gradient_penalty import (  # noqa: E402
    discriminator_input_gradient,
    gradient_penalty_autograd,
    interpolate,
    interpolate_reference,
    interpolation_epsilon,
    norm_penalty,
    norm_penalty_reference,
)
from fastmlgan.kernels.gumbel_sigmoid import gumbel_sigmoid, gumbel_sigmoid_reference, logistic_noise  # noqa: E402
from fastmlgan.models.discriminator import Discriminator  # noqa: E402

GUMBEL_SHAPES = [(256, 80), (1024, 80), (4096, 81)]
NUM_LABELS, FEATURE_DIM = 80, 2048
INV_TEMPERATURE = 0.9
GP_WEIGHT = 10.0
CPU_TRITON_NOTE = "Triton rows skipped on CPU: they would run Triton's interpreter, whose timings mean nothing."


# ---------------------------------------------------------------------------------------------
# Gumbel sigmoid
# ---------------------------------------------------------------------------------------------


def _gumbel_reference(logits: torch.Tensor) -> torch.Tensor:
    return gumbel_sigmoid_reference(logits, logistic_noise(logits.shape, logits.device), INV_TEMPERATURE)


def gumbel_variants(device: str, include_triton: bool) -> dict[str, tuple[str | None, Callable]]:
    """name → (FASTMLGAN_KERNELS value or None, function of logits returning the sample).

    Compiled with static shapes: one graph per benchmarked shape, as a training run has. (With
    automatic dynamic shapes the second shape fails to trace: ``torch.rand`` with ``generator=None``
    rejects symbolic sizes, torch 2.14.)
    """
    variants = {
        "eager torch chain": (None, _gumbel_reference),
        "torch.compile(reference)": (None, torch.compile(_gumbel_reference, fullgraph=True, dynamic=False)),
        "fastmlgan op, torch path": ("torch", lambda x: gumbel_sigmoid(x, INV_TEMPERATURE)),
    }
    if include_triton:
        variants["fastmlgan op, Triton"] = ("triton", lambda x: gumbel_sigmoid(x, INV_TEMPERATURE))
    return variants


def gumbel_step(sample: Callable, logits: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    def step():
        logits.grad = None
        sample(logits).backward(grad_out)

    return step


# ---------------------------------------------------------------------------------------------
# The D step
# ---------------------------------------------------------------------------------------------


def build_discriminator(device: str, seed: int = 0, **sizes) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(NUM_LABELS, FEATURE_DIM, **sizes).to(device)


def d_batch(batch_size: int, device: str, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    real = (torch.rand(batch_size, NUM_LABELS, generator=gen) < 3 / NUM_LABELS).float()
    batch = {
        "real": real,
        "fake": torch.rand(batch_size, NUM_LABELS, generator=gen),
        "mismatched": real.roll(1, dims=0),
        "features": torch.randn(batch_size, FEATURE_DIM, generator=gen),
        "seed": torch.randint(0, _dispatch.SEED_HIGH, (), generator=gen),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _scores_part(discriminator, real, fake, mismatched, features):
    scores = discriminator(torch.cat([real, fake, mismatched]), torch.cat([features] * 3))
    matched, generated, negative = scores.split(real.shape[0])
    return -matched.mean() + 0.5 * generated.mean() + 0.5 * negative.mean()


def d_loss_textbook(discriminator, real, fake, mismatched, features, epsilon):
    gp = gradient_penalty_autograd(discriminator, real, fake, features, epsilon)
    return _scores_part(discriminator, real, fake, mismatched, features) + GP_WEIGHT * gp


def d_loss_first_order_reference(discriminator, real, fake, mismatched, features, epsilon):
    """First order, all pure torch ops: what torch.compile sees whole and fuses itself."""
    labels = interpolate_reference(real, fake, epsilon)
    gp = norm_penalty_reference(discriminator_input_gradient(discriminator, labels, features))
    return _scores_part(discriminator, real, fake, mismatched, features) + GP_WEIGHT * gp


def d_loss_fastmlgan_ops(discriminator, real, fake, mismatched, features, seed):
    """``gradient_penalty`` after its seed draw: ε from ``seed`` in the interpolation op."""
    labels = interpolate(real, fake, seed)
    gp = norm_penalty(discriminator_input_gradient(discriminator, labels, features))
    return _scores_part(discriminator, real, fake, mismatched, features) + GP_WEIGHT * gp


def d_step_variants(include_triton: bool) -> dict[str, tuple[str | None, Callable, str]]:
    """name → (FASTMLGAN_KERNELS value or None, loss function, its random input: epsilon|seed)."""
    variants = {
        "eager, double backward": (None, d_loss_textbook, "epsilon"),
        "eager, first order": (None, d_loss_first_order_reference, "epsilon"),
        "compiled, first order (torch)": (
            None,
            torch.compile(d_loss_first_order_reference, fullgraph=True, dynamic=False),
            "epsilon",
        ),
        "compiled, fastmlgan ops torch path": (
            "torch",
            torch.compile(d_loss_fastmlgan_ops, fullgraph=True, dynamic=False),
            "seed",
        ),
    }
    if include_triton:
        variants["compiled + Triton"] = (
            "triton",
            torch.compile(d_loss_fastmlgan_ops, fullgraph=True, dynamic=False),
            "seed",
        )
    return variants


def d_step(
    loss_fn: Callable, discriminator: Discriminator, batch: dict, random_input: str
) -> Callable[[], torch.Tensor]:
    rand = batch["seed"] if random_input == "seed" else interpolation_epsilon(batch["seed"], batch["real"].shape[0])
    params = list(discriminator.parameters())

    def step():
        for p in params:
            p.grad = None
        loss = loss_fn(discriminator, batch["real"], batch["fake"], batch["mismatched"], batch["features"], rand)
        loss.backward()
        return loss

    return step


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class _Backend:
    """Sets FASTMLGAN_KERNELS for one variant (None leaves it unset)."""

    def __init__(self, value: str | None):
        self.value, self.saved = value, None

    def __enter__(self):
        self.saved = os.environ.pop(_dispatch.ENV_VAR, None)
        if self.value is not None:
            os.environ[_dispatch.ENV_VAR] = self.value

    def __exit__(self, *exc):
        os.environ.pop(_dispatch.ENV_VAR, None)
        if self.saved is not None:
            os.environ[_dispatch.ENV_VAR] = self.saved


def quiet_compile_workers() -> None:
    """Compile in-process on CPU: inductor's worker pool keeps warming up for seconds after the
    first compile and, on a 2-core machine, made steps 3–8 after it 5–50× slower (measured)."""
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1


def measure(step: Callable, device: str, repeats: int, warmup: int) -> dict[str, float]:
    """First call (compilation included) timed alone, then the median of ``repeats`` calls."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    first_call_s = time.perf_counter() - start
    if device.startswith("cuda"):
        import triton.testing

        for _ in range(warmup):
            step()
        median_ms = triton.testing.do_bench(step, warmup=25, rep=max(100, 10 * repeats), return_mode="median")
        return {"median_ms": median_ms, "first_call_s": first_call_s}
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median_ms": statistics.median(times),
        "q1_ms": quartiles[0],
        "q3_ms": quartiles[2],
        "first_call_s": first_call_s,
        "repeats": repeats,
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return (
                    f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
                )
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_revision() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    revision = git("rev-parse", "HEAD") or "unknown (no commit)"
    return revision + ("+dirty" if git("status", "--porcelain") else "")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None, help="D-step batch sizes (default 64 128 256; --quick: 64)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 20; --quick: 5)")
    parser.add_argument("--quick", action="store_true", help="one D batch size, fewer repeats, Gumbel at 256×80 only")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/kernels-<device>.json)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a shared CPU use 1: with 2 OpenMP threads and a "
        "busy neighbour every parallel region waited ~16 ms for the descheduled thread (measured)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch or ([64] if args.quick else [64, 128, 256])
    repeats = args.repeats or (5 if args.quick else 20)
    warmup = 2 if args.quick else 3
    shapes = GUMBEL_SHAPES[:1] if args.quick else GUMBEL_SHAPES
    include_triton = device.startswith("cuda") and _dispatch.HAS_TRITON
    if not device.startswith("cuda"):
        quiet_compile_workers()
    notes = [] if include_triton else [CPU_TRITON_NOTE]
    rows = []

    print(
        f"device: {_device_name(device)}; torch {torch.__version__}; triton "
        f"{getattr(_dispatch.triton, '__version__', 'absent')}; repeats {repeats}"
    )
    for note in notes:
        print(f"note: {note}")

    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
        grad_out = torch.randn(shape, generator=gen).to(device)
        for name, (backend, sample) in gumbel_variants(device, include_triton).items():
            with _Backend(backend):
                result = measure(gumbel_step(sample, logits, grad_out), device, repeats, warmup)
            rows.append(
                {"case": "gumbel_sigmoid fwd+bwd", "size": "x".join(map(str, shape)), "variant": name, **result}
            )
            _print_row(rows[-1])

    for batch_size in batches:
        d = build_discriminator(device)
        batch = d_batch(batch_size, device)
        worst = 0.0
        for name, (backend, loss_fn, random_input) in d_step_variants(include_triton).items():
            with _Backend(backend):
                step = d_step(loss_fn, d, batch, random_input)
                result = measure(step, device, repeats, warmup)
                # Each variant's loss against the eager textbook loss at the same ε (the ε a seed
                # gives differs between the torch and Triton paths).
                epsilon = interpolation_epsilon(batch["seed"], batch_size)
                loss = step().item()
                expected = d_loss_textbook(
                    d, batch["real"], batch["fake"], batch["mismatched"], batch["features"], epsilon
                ).item()
            worst = max(worst, abs(loss - expected) / max(abs(expected), 1e-12))
            rows.append({"case": "D loss fwd+bwd", "size": f"B={batch_size}", "variant": name, "loss": loss, **result})
            _print_row(rows[-1])
        print(f"  B={batch_size}: every variant's loss is within {worst:.1e} (relative) of the eager textbook loss")

    record = {
        "device": _device_name(device),
        "device_arg": device,
        "torch": torch.__version__,
        "triton": getattr(_dispatch.triton, "__version__", None),
        "python": platform.python_version(),
        "git_revision": _git_revision(),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/kernels.py", *argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_threads": torch.get_num_threads(),
        "timer": "triton.testing.do_bench median"
        if device.startswith("cuda")
        else "perf_counter loop, median after warm-up",
        "notes": notes,
        "results": rows,
    }
    out = args.out or REPO_ROOT / "bench" / "results" / f"kernels-{device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


_HEADER_PRINTED = False


def _print_row(row: dict) -> None:
    global _HEADER_PRINTED
    if not _HEADER_PRINTED:
        print(f"{'case':<24} {'size':<8} {'variant':<36} {'median ms':>10} {'first call s':>13}")
        _HEADER_PRINTED = True
    print(
        f"{row['case']:<24} {row['size']:<8} {row['variant']:<36} {row['median_ms']:>10.3f} {row['first_call_s']:>13.2f}"
    )


if __name__ == "__main__":
    main()
