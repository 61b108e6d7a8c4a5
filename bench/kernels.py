"""Benchmark of the fused kernels against the plain alternatives, in one run; and the table that
``FASTMLGAN_KERNELS=auto`` dispatches from.

    python bench/kernels.py [--device cpu|cuda] [--batch 64 128 256] [--repeats 20] [--quick] [--out PATH]
                            [--threads N]
    python bench/kernels.py --write-dispatch RESULTS.json [RESULTS.json ...] [--dispatch-out PATH]

Three cases, each timed as forward + backward, median over ``--repeats`` after warm-up (compilation
happens in the warm-up, outside the timed region, and is reported separately):

* Gumbel sigmoid (§3.2) alone at 256×80, 1024×80, 4096×81: the eager torch chain
  (``logistic_noise`` + ``gumbel_sigmoid_reference``), ``torch.compile`` of that chain, the
  registered op with its torch implementation inside, and the op on the Triton path (eager and
  compiled).
* Gumbel sigmoid among its neighbours, 256×80: one compiled function with G's head (a linear layer
  on 512-d features), the BCE of eq. (1), the sample and D's label projection, i.e. the ops of the
  G step that touch ŷ. Eager; compiled with the sampler inlined as plain torch ops (inductor can
  fuse it); compiled with the custom op (opaque to inductor) on its torch and Triton paths.
* The D loss of eq. (4) with λ·L_gp (eq. 5) and its backward (no optimiser step, which is the
  same for every variant), 80 labels, 2048-d features, the default D (256/512/8 layers):
  eager with the textbook double backward, first order in plain torch (eager and compiled), the
  same with the fastmlgan ops on their torch path (compiled) and on the Triton path (eager and
  compiled).

Every row is tagged with the op it stands for, its mode (eager or compiled) and its dispatch path
(``triton``: the custom op on Triton; ``torch``: plain torch ops; none: a row that no dispatch
choice runs, e.g. the textbook double backward). ``--write-dispatch`` turns results files into
``fastmlgan/kernels/dispatch.json``: per device type, op and mode, Triton where the geometric mean
over the measured sizes of (fastest Triton row / fastest torch row) is below 1, else torch (also
where no Triton row exists, as on CPU). It prints what changed against the table it starts from.

On CUDA the timer is ``triton.testing.do_bench`` (median); on CPU a perf_counter loop. On CPU the
Triton rows are skipped: they would run Triton's interpreter, whose timings mean nothing.
Results go to a table on stdout and to JSON (``--out``, default bench/results/kernels-<device>.json)
with the device, versions, git revision and the exact command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fastmlgan import environment  # noqa: E402
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
from fastmlgan.losses import logistic_loss  # noqa: E402
from fastmlgan.models.discriminator import Discriminator  # noqa: E402

GUMBEL_SHAPES = [(256, 80), (1024, 80), (4096, 81)]
FUSED_BATCH = 256
# G's head input in the fused case: resnet18's feature width, so that the head's matmul does not
# swamp the ops around ŷ (ResNet-101's 2048 makes it 4× larger).
FUSED_FEATURE_DIM = 512
NUM_LABELS, FEATURE_DIM = 80, 2048
INV_TEMPERATURE = 0.9
GP_WEIGHT = 10.0
CPU_TRITON_NOTE = "Triton rows skipped on CPU: they would run Triton's interpreter, whose timings mean nothing."


class Variant(NamedTuple):
    """One benchmarked implementation: the FASTMLGAN_KERNELS value it runs under (None: unset),
    the callable, and its dispatch tags (``path`` None: no dispatch choice runs it)."""

    backend: str | None
    fn: Callable
    path: str | None
    mode: str


# ---------------------------------------------------------------------------------------------
# Gumbel sigmoid
# ---------------------------------------------------------------------------------------------


def _gumbel_reference(logits: torch.Tensor) -> torch.Tensor:
    return gumbel_sigmoid_reference(logits, logistic_noise(logits.shape, logits.device), INV_TEMPERATURE)


def _gumbel_op(logits: torch.Tensor) -> torch.Tensor:
    """The registered op itself (what the Triton path calls), whatever the dispatch table says."""
    seed = _dispatch.draw_seed(logits.device)
    return torch.ops.fastmlgan.gumbel_sigmoid(logits, seed, INV_TEMPERATURE, False)


def gumbel_variants(device: str, include_triton: bool) -> dict[str, Variant]:
    """name → Variant of a function of logits returning the sample.

    Compiled with static shapes: one graph per benchmarked shape, as a training run has.
    """
    variants = {
        "eager torch chain": Variant(None, _gumbel_reference, "torch", "eager"),
        "torch.compile(reference)": Variant(
            None, torch.compile(_gumbel_reference, fullgraph=True, dynamic=False), "torch", "compiled"
        ),
        "custom op, torch inside": Variant("torch", _gumbel_op, None, "eager"),
    }
    if include_triton:
        variants["fastmlgan op, Triton"] = Variant("triton", _gumbel_op, "triton", "eager")
        variants["torch.compile(op, Triton)"] = Variant(
            "triton", torch.compile(_gumbel_op, fullgraph=True, dynamic=False), "triton", "compiled"
        )
    return variants


def gumbel_step(sample: Callable, logits: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    def step():
        logits.grad = None
        sample(logits).backward(grad_out)

    return step


# ---------------------------------------------------------------------------------------------
# Gumbel sigmoid among its neighbours in the G step
# ---------------------------------------------------------------------------------------------


def head_bce_gumbel_d_input(head, label_proj, features, targets, sample) -> torch.Tensor:
    """G's head, eq. (1)'s BCE, ŷ = ``sample(logits)`` and D's label projection of ŷ: the ops of
    the G step (eq. 2) around the sampler, which inductor may fuse with it when it can see it."""
    logits = head(features)
    return logistic_loss(logits, targets) - label_proj(sample(logits)).mean()


def _inlined(logits: torch.Tensor) -> torch.Tensor:
    # FASTMLGAN_KERNELS=torch: the public call is plain torch ops, traced into the caller's graph.
    return gumbel_sigmoid(logits, INV_TEMPERATURE)


def fused_variants(include_triton: bool) -> dict[str, Variant]:
    """name → Variant of a function (head, label_proj, features, targets) → loss."""

    def compiled(sample):
        def step(head, label_proj, features, targets):
            return head_bce_gumbel_d_input(head, label_proj, features, targets, sample)

        return torch.compile(step, fullgraph=True, dynamic=False)

    def eager(sample):
        return lambda head, label_proj, features, targets: head_bce_gumbel_d_input(
            head, label_proj, features, targets, sample
        )

    variants = {
        "eager, torch chain": Variant("torch", eager(_inlined), "torch", "eager"),
        "compiled, inlined torch": Variant("torch", compiled(_inlined), "torch", "compiled"),
        "compiled, custom op (torch inside)": Variant("torch", compiled(_gumbel_op), None, "compiled"),
    }
    if include_triton:
        variants["eager, custom op (Triton)"] = Variant("triton", eager(_gumbel_op), "triton", "eager")
        variants["compiled, custom op (Triton)"] = Variant("triton", compiled(_gumbel_op), "triton", "compiled")
    return variants


def fused_step(fn: Callable, device: str, batch_size: int = FUSED_BATCH) -> Callable[[], torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(3)
    head = torch.nn.Linear(FUSED_FEATURE_DIM, NUM_LABELS).to(device)
    label_proj = torch.nn.Linear(NUM_LABELS, 256).to(device)
    features = torch.randn(batch_size, FUSED_FEATURE_DIM, generator=gen).to(device)
    targets = (torch.rand(batch_size, NUM_LABELS, generator=gen) < 3 / NUM_LABELS).float().to(device)
    params = list(head.parameters()) + list(label_proj.parameters())

    def step():
        for p in params:
            p.grad = None
        loss = fn(head, label_proj, features, targets)
        loss.backward()
        return loss

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


def d_step_variants(include_triton: bool) -> dict[str, tuple[Variant, str]]:
    """name → (Variant of a loss function, its random input: epsilon|seed)."""

    def compiled(fn):
        return torch.compile(fn, fullgraph=True, dynamic=False)

    variants = {
        "eager, double backward": (Variant(None, d_loss_textbook, None, "eager"), "epsilon"),
        "eager, first order": (Variant(None, d_loss_first_order_reference, "torch", "eager"), "epsilon"),
        "compiled, first order (torch)": (
            Variant(None, compiled(d_loss_first_order_reference), "torch", "compiled"),
            "epsilon",
        ),
        "compiled, fastmlgan ops torch path": (
            Variant("torch", compiled(d_loss_fastmlgan_ops), None, "compiled"),
            "seed",
        ),
    }
    if include_triton:
        variants["eager, first order + Triton"] = (Variant("triton", d_loss_fastmlgan_ops, "triton", "eager"), "seed")
        variants["compiled + Triton"] = (
            Variant("triton", compiled(d_loss_fastmlgan_ops), "triton", "compiled"),
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
    name = environment.device_name(device)
    return name if device.startswith("cuda") else f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


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
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=("inductor", "aot_eager"),
        help="aot_eager: trace the compiled rows with dynamo + AOTAutograd but run them eagerly (the GPU check's CPU "
        "dry run: its timings mean nothing, its code paths are the real ones)",
    )
    parser.add_argument(
        "--write-dispatch",
        type=Path,
        nargs="+",
        default=None,
        metavar="RESULTS",
        help="benchmark nothing: derive the dispatch table from these results files (one per device type)",
    )
    parser.add_argument(
        "--dispatch-out",
        type=Path,
        default=_dispatch.DISPATCH_TABLE,
        help="where --write-dispatch writes the table (default: the package's, fastmlgan/kernels/dispatch.json); "
        "it starts from the table already there, else from the package's",
    )
    return parser.parse_args(argv)


def _command(argv) -> str:
    return shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/kernels.py", *argv])


def run_benchmarks(args: argparse.Namespace, argv=None) -> dict:
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_backend != "inductor":
        real_compile = torch.compile

        def compile_with(fn=None, **kwargs):  # as bench/train.py's use_compile_backend
            kwargs.pop("mode", None)
            kwargs["backend"] = args.compile_backend
            return real_compile(fn, **kwargs) if fn is not None else (lambda f: real_compile(f, **kwargs))

        torch.compile = compile_with
    batches = args.batch or ([64] if args.quick else [64, 128, 256])
    repeats = args.repeats or (5 if args.quick else 20)
    warmup = 2 if args.quick else 3
    shapes = GUMBEL_SHAPES[:1] if args.quick else GUMBEL_SHAPES
    include_triton = device.startswith("cuda") and _dispatch.HAS_TRITON
    if not device.startswith("cuda"):
        quiet_compile_workers()
    notes = [] if include_triton else [CPU_TRITON_NOTE]
    notes.append(
        "fused case: the variants draw different noise (eager RNG, inductor RNG, Philox), so their losses "
        "are checked for finiteness only; the samplers' distributions are tested in tests/unit/kernels/test_gumbel_sigmoid.py"
    )
    load_before = os.getloadavg()
    rows = []

    def add(case, size, name, variant, result, **extra):
        rows.append(
            {
                "case": case,
                "size": size,
                "variant": name,
                "op": "gradient_penalty" if case.startswith("D loss") else "gumbel_sigmoid",
                "path": variant.path,
                "mode": variant.mode,
                **extra,
                **result,
            }
        )
        _print_row(rows[-1])

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
        for name, variant in gumbel_variants(device, include_triton).items():
            with _Backend(variant.backend):
                result = measure(gumbel_step(variant.fn, logits, grad_out), device, repeats, warmup)
            add("gumbel_sigmoid fwd+bwd", "x".join(map(str, shape)), name, variant, result)

    for name, variant in fused_variants(include_triton).items():
        with _Backend(variant.backend):
            step = fused_step(variant.fn, device)
            result = measure(step, device, repeats, warmup)
            loss = step().item()
        if not math.isfinite(loss):
            raise RuntimeError(f"fused case, {name}: loss {loss}")
        add("head+BCE+gumbel+D input", f"{FUSED_BATCH}x{NUM_LABELS}", name, variant, result, loss=loss)

    for batch_size in batches:
        d = build_discriminator(device)
        batch = d_batch(batch_size, device)
        worst = 0.0
        for name, (variant, random_input) in d_step_variants(include_triton).items():
            with _Backend(variant.backend):
                step = d_step(variant.fn, d, batch, random_input)
                result = measure(step, device, repeats, warmup)
                # Each variant's loss and D gradients against the eager textbook ones at the same ε
                # (the ε a seed gives differs between the torch and Triton paths). The gradients
                # carry the check: at initialisation ‖∇D‖ ≈ 0, so L_gp ≈ 1 on every path.
                epsilon = interpolation_epsilon(batch["seed"], batch_size)
                loss = step().item()
                grads = [p.grad.clone() for p in d.parameters()]
                expected_loss = d_loss_textbook(
                    d, batch["real"], batch["fake"], batch["mismatched"], batch["features"], epsilon
                )
                expected = torch.autograd.grad(expected_loss, list(d.parameters()))
            error = max(
                [abs(loss - expected_loss.item()) / max(abs(expected_loss.item()), 1e-12)]
                + [((g - e).abs().max() / e.abs().max().clamp_min(1e-12)).item() for g, e in zip(grads, expected)]
            )
            if error > 1e-3:
                raise RuntimeError(
                    f"D loss B={batch_size}, {name}: loss or gradients off the textbook's by {error:.1e}"
                )
            worst = max(worst, error)
            add("D loss fwd+bwd", f"B={batch_size}", name, variant, result, loss=loss)
        print(
            f"  B={batch_size}: every variant's loss and D gradients are within {worst:.1e} (relative to the "
            "largest entry) of the eager textbook's"
        )

    record = {
        "device": _device_name(device),
        "device_arg": device,
        "torch": torch.__version__,
        "triton": getattr(_dispatch.triton, "__version__", None),
        "python": platform.python_version(),
        "git_revision": environment.git_revision() or "unknown",
        "command": _command(argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_threads": torch.get_num_threads(),
        "compile_backend": args.compile_backend,
        # On a shared machine the neighbours' load moves every row; compare rows of one run only.
        "load_average_1_5_15min": {"start": list(load_before), "end": list(os.getloadavg())},
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


# ---------------------------------------------------------------------------------------------
# The dispatch table
# ---------------------------------------------------------------------------------------------


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def choose_paths(results: list[dict]) -> dict[str, dict[str, dict]]:
    """op → mode → {"path", "why", "median_ms", "triton_over_torch"} from one results file's rows.

    Within each (case, size) that has both, the fastest Triton row over the fastest torch row; the
    geometric mean of those ratios over the sizes decides (Triton only if below 1, so a tie or a
    mode without a Triton row keeps the torch reference).
    """
    table: dict[str, dict[str, dict]] = {}
    for op in _dispatch.OPS:
        for mode in _dispatch.MODES:
            rows = [r for r in results if r.get("op") == op and r.get("mode") == mode and r.get("path")]
            best: dict[str, dict[str, float]] = {}
            for r in rows:
                group = best.setdefault(f"{r['case']} {r['size']}", {})
                group[r["path"]] = min(group.get(r["path"], math.inf), r["median_ms"])
            ratios = {g: p["triton"] / p["torch"] for g, p in best.items() if {"triton", "torch"} <= p.keys()}
            if ratios:
                mean = math.exp(sum(math.log(x) for x in ratios.values()) / len(ratios))
                path = "triton" if mean < 1.0 else "torch"
                why = f"Triton/torch time, geometric mean over {len(ratios)} size(s): {mean:.3f}"
            elif rows:
                path, why = "torch", "no Triton row in this mode: the torch reference is the default"
            else:
                path, why = "torch", "not measured in this mode: the torch reference is the default"
            table.setdefault(op, {})[mode] = {
                "path": path,
                "why": why,
                "median_ms": {f"{r['case']} {r['size']}: {r['variant']}": round(r["median_ms"], 4) for r in rows},
                "triton_over_torch": {g: round(x, 4) for g, x in ratios.items()},
            }
    return table


def write_dispatch(results_files: list[Path], out: Path, argv=None) -> dict:
    """Merge one device entry per results file into the table at ``out`` (or the package's) and
    write it; print every (device type, op, mode) whose path changes."""
    start = out if out.exists() else _dispatch.DISPATCH_TABLE
    started_from = _display_path(start) if start.exists() else "nothing"
    table = json.loads(start.read_text()) if start.exists() else {"devices": {}}
    before = _dispatch.read_dispatch_table(start) if start.exists() else {}
    for path in results_files:
        record = json.loads(path.read_text())
        device_type = record["device_arg"].split(":")[0]
        table["devices"][device_type] = {
            "source": _display_path(path),
            **{k: record.get(k) for k in ("device", "torch", "triton", "git_revision", "command", "date")},
            **({"transcribed": record["transcribed"]} if "transcribed" in record else {}),
            "ops": choose_paths(record["results"]),
        }
    table["about"] = (
        "The path FASTMLGAN_KERNELS=auto runs per device type, op and mode (fastmlgan/kernels/_dispatch.py). "
        "Generated by bench/kernels.py --write-dispatch from the results files named in each device's "
        "'source'; regenerate rather than edit."
    )
    table["command"] = _command(argv)
    table["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    table = {"about": table.pop("about"), "command": table.pop("command"), "written": table.pop("written"), **table}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    after = _dispatch.read_dispatch_table(out)
    # A missing entry runs torch (``_dispatch.auto_path``), so only a different effective path counts.
    changes = [
        f"  {key}: {before.get(key, 'torch')} -> {after.get(key, 'torch')}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, "torch") != after.get(key, "torch")
    ]
    print(f"wrote {out} (starting from {started_from})")
    print("auto path changes:" if changes else "auto path changes: none")
    for line in changes:
        print(line)
    print("auto paths now:")
    for key in sorted(after):
        print(f"  {key}: {after[key]}")
    return table


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.write_dispatch:
        return write_dispatch(args.write_dispatch, args.dispatch_out, argv)
    return run_benchmarks(args, argv)


_HEADER_PRINTED = False


def _print_row(row: dict) -> None:
    global _HEADER_PRINTED
    if not _HEADER_PRINTED:
        print(
            f"{'case':<24} {'size':<8} {'variant':<36} {'path':<7} {'mode':<9} {'median ms':>10} {'first call s':>13}"
        )
        _HEADER_PRINTED = True
    print(
        f"{row['case']:<24} {row['size']:<8} {row['variant']:<36} {row['path'] or '-':<7} {row['mode']:<9} "
        f"{row['median_ms']:>10.3f} {row['first_call_s']:>13.2f}"
    )


if __name__ == "__main__":
    main()
