"""``fastmlgan reproduce`` (also ``python -m fastmlgan.reproduce``): the reproduction harness
(``fastmlgan.reproduce``) with the train command's options plus the harness's."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fastmlgan.config import Config, help_text, parse_args
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.logs import setup_logging
from fastmlgan.reproduce.protocol import DEFAULT_VARIANTS, SELECTION_RULE, VARIANTS, HarnessOptions
from fastmlgan.reproduce.runner import Harness
from fastmlgan.safeio import describe_os_error, one_line, stdout_failed

PROG = "fastmlgan reproduce"
MAX_SEEDS = 1000

HARNESS_HELP = f"""usage: {PROG} [--seeds N|S1,S2,...] [--out DIR] [--variants V1,V2,...] [--val-fraction F]
       [--threads N] [--no-plots] [--verbose] [--preset NAME] [--section.key VALUE ...]

Runs the rows of Tables 1 and 3 (variants: {", ".join(VARIANTS)}; default: {",".join(DEFAULT_VARIANTS)})
over several seeds; one phase-1 run per seed is shared by all variants of that seed, except
that asl and ema run a phase 1 of their own (asl_wgan starts from asl's).

  --seeds N | S1,S2,..  N seeds 0..N-1, or an explicit comma-separated list (default 5)
  --out DIR             results folder (default runs/reproduce-<preset>); a rerun skips finished rows
  --variants V1,V2,..   rows to run; the baseline always runs (it is phase 1)
  --val-fraction F      share of the training split held out for selection (default 0.2)
  --threads N           torch CPU threads (default: torch's choice, i.e. OMP_NUM_THREADS)
  --no-plots            skip the PNGs
  --verbose             the trainer's per-epoch log on stdout (otherwise in runs/*/train.log)

Selection: {SELECTION_RULE}.
"""


def parse_harness_args(argv: Sequence[str]) -> tuple[HarnessOptions, Config] | None:
    """Split the harness options from the ``fastmlgan.train`` ones; None after printing --help."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(HARNESS_HELP)
        print(help_text(PROG))
        return None
    values, rest = _split_harness_options(argv)
    cfg = parse_args(rest, prog=PROG)
    assert cfg is not None  # --help was handled above
    if cfg.resume:
        raise ConfigError("--resume is fastmlgan.train's; rerun the harness with the same --out to continue it")
    seeds = _parse_seeds(values.get("seeds", "5"))
    variants = _parse_variants(values.get("variants", ",".join(DEFAULT_VARIANTS)))
    try:
        val_fraction = float(values.get("val-fraction", "0.2"))
        threads = int(values.get("threads", "0"))
    except ValueError as e:
        raise ConfigError(f"--val-fraction / --threads: {e}") from None
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if not 0 <= threads <= 1024:
        raise ConfigError(f"--threads must be in [0, 1024] (0: torch's choice), got {threads}")
    out = Path(values.get("out") or f"runs/reproduce-{cfg.preset}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is not a folder; give a folder")
    if len(variants) > 1 and cfg.train.gan_epochs < 1:
        raise ConfigError("the GAN variants need --train.gan_epochs >= 1 (selection is among epochs 1..gan_epochs)")
    opts = HarnessOptions(
        seeds=seeds,
        out=out,
        variants=variants,
        val_fraction=val_fraction,
        threads=threads,
        plots="plots" not in values,
        verbose="verbose" in values,
    )
    return opts, cfg


def _split_harness_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """({harness option: value}, the arguments left for ``fastmlgan.config.parse_args``)."""
    values: dict[str, str] = {}
    flags = {"--no-plots": "plots", "--verbose": "verbose"}
    with_value = ("--seeds", "--out", "--variants", "--val-fraction", "--threads")
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if arg in flags:
            values[flags[arg]] = "1"
        elif key in with_value:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{key} needs a value")
                value = argv[i + 1]
                i += 1
            values[key[2:]] = value
        else:
            rest.append(arg)
        i += 1
    return values, rest


def _parse_seeds(text: str) -> list[int]:
    try:
        numbers = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected a count N or a list S1,S2,..., got {text!r}") from None
    if "," not in text and numbers:
        if numbers[0] > MAX_SEEDS:  # before range(): --seeds 10**12 would fill the memory
            raise ConfigError(f"--seeds {numbers[0]}: at most {MAX_SEEDS} seeds (each is a full set of training runs)")
        numbers = list(range(numbers[0]))
    seeds = numbers
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) > 2**32 - 1 or len(seeds) > MAX_SEEDS:
        raise ConfigError(
            f"--seeds: need 1 to {MAX_SEEDS} seeds in [0, 4294967295], no repeats; got {text[:60]!r}"
        )
    return seeds


def _parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    # The baseline is phase 1, which every other row starts from: always run it, first.
    return ["baseline"] + [v for v in dict.fromkeys(names) if v != "baseline"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = parse_harness_args(argv)
        if parsed is None:
            return 0
        opts, cfg = parsed
        setup_logging(True)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        results = Harness(opts, cfg, f"{PROG} {shlex.join(argv)}").run()
        print((opts.out / "results.md").read_text().split("## Paired differences")[0], flush=True)
        print(f"results: {opts.out / 'results.json'}, {opts.out / 'results.md'}", flush=True)
        return 0 if results["variants"] else 1
    except FastMLGANError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the results folder removed, read-only or full; standard output full
        print(stdout_failed(e) if e.filename is None else f"error: {e.filename}: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; finished rows are in results.jsonl and a rerun with the same --out skips them",
            file=sys.stderr,
        )
        return 130
