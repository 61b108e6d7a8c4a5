"""The reproduction harness: Tables 1 and 3 of Tsai & Lee over several seeds, with every choice
made on a validation split carved from the training data and the test split used once.

    python -m fastmlgan.reproduce --preset reproduce-mulan \\
        --data.features_train scene-train.arff --data.features_test scene-test.arff \\
        --data.features_xml scene.xml --seeds 5 --out docs/results/scene

Dataset, model and GAN options are those of ``fastmlgan.train``; the harness adds ``--seeds``,
``--out``, ``--variants``, ``--val-fraction``, ``--threads``, ``--no-plots`` and ``--verbose``.

Protocol (also written into ``results.json`` and ``results.md``), for every seed s:

1. **Split.** ``val_fraction`` of the training split, drawn with ``numpy.random.default_rng
   ([VAL_STREAM, s])``, is held out for validation; the rest (the *fit* split) is all that G and D
   are trained on. The evaluation split of the config (``--data.features_test``, the COCO/embedded
   val set) is the *test* split: it is read once per (seed, variant), after selection.
2. **Phase 1** (the baseline row): BCE training of G for up to ``train.bce_epochs`` epochs,
   evaluated on the validation split every ``train.eval_every`` epochs. The selected phase-1
   epoch is the evaluated one with the highest validation C-F1 (ties: the earliest).
3. **Phase 2**, one run per variant, all starting from the selected phase-1 state (``Trainer.
   start_from_baseline``, fresh D): up to ``train.gan_epochs`` epochs, the selected GAN epoch
   chosen by the same rule among epochs >= 1 (0 would be the baseline itself).
4. **Test.** The selected G of each row is evaluated once on the test split.

Finished (seed, variant) rows are appended to ``results.jsonl`` as they finish; a rerun with the
same ``--out`` skips them (and refuses a config that differs from the one they were run with).
Per-run folders (logs, the selected phase-1 state, test scores) are under ``runs/``, which the
``.gitignore`` written into ``--out`` keeps out of commits.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmlgan import __version__
from fastmlgan import checkpoint as ckpt
from fastmlgan.config import Config, config_from_dict, help_text, parse_args
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.metrics import PRF_KEYS, compute_metrics
from fastmlgan.trainer import Trainer

logger = logging.getLogger("fastmlgan.reproduce")

PROG = "python -m fastmlgan.reproduce"
VAL_STREAM = 20190512  # first entry of the validation-split seed sequence (any fixed constant)
SELECTION_KEY = "C-F1"
SELECTION_RULE = (
    f"per seed, the evaluated epoch with the highest validation {SELECTION_KEY} (ties: the earliest); "
    "phase 1 among epochs 1..train.bce_epochs (0 when it is 0), phase 2 per variant among epochs "
    "1..train.gan_epochs, evaluated every train.eval_every epochs and at the last"
)
TABLE_KEYS = (*PRF_KEYS, "mAP", "avg_labels")
DIFF_KEYS = ("C-F1", "O-F1", "C-P", "C-R", "O-P", "O-R", "mAP", "avg_labels")
D_LOG_KEYS = ("loss_d", "wasserstein", "gp", "d_matched", "d_generated", "d_mismatched", "g_adversarial", "bce")


# ----------------------------------------------------------------------------------------------
# The rows of Tables 1 and 3


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    """The row's name in the paper's tables."""
    table3: str
    """Its Table 3 row letter ('' for the extra diagnostic rows)."""
    overrides: dict[str, Any] | None
    """Config overrides of phase 2; None for the baseline (phase 1 only)."""
    adversarial: bool = True
    """False: the control row, phase 2's schedule with G trained on L_logistic alone (no D)."""


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("baseline", "baseline (BCE only)", "(a)", None),
        Variant("wgan", "+ WGAN-gp", "(b)", {}),
        Variant("no_negative", "w/o negative sampling", "(c)", {"gan.negative_sampling": False}),
        # Table 3 (d) is (c) with an unconditional D: "In rows (c) and (d), we do not perform
        # negative sampling" (§4.2.3); a mismatched pair is meaningless without the image anyway.
        Variant(
            "no_conditional", "w/o conditional D", "(d)", {"gan.negative_sampling": False, "gan.conditional": False}
        ),
        Variant("no_gumbel", "w/o Gumbel sigmoid", "(e)", {"gan.gumbel": False}),
        # Not in the paper: phase 2 continues G at g_lr with α·L_logistic, so a GAN row also gets
        # more BCE training than the baseline. This control gets the same G steps (and consumes the
        # same batches) without D: what the GAN rows gain over it is the discriminator's doing.
        Variant("bce_continued", "control: BCE continued, no D", "", {}, adversarial=False),
        # Diagnostic rows, not in the paper (select them with --variants).
        Variant("hard_samples", "+ WGAN-gp, straight-through hard samples", "", {"gan.hard_samples": True}),
        Variant("gp_weight_1", "+ WGAN-gp, λ = 1", "", {"gan.gp_weight": 1.0}),
        Variant("bce_weight_1", "+ WGAN-gp, α = 1", "", {"gan.bce_weight": 1.0}),
    )
}
TABLE_VARIANTS = ("baseline", "wgan", "no_negative", "no_conditional", "no_gumbel")
DEFAULT_VARIANTS = (*TABLE_VARIANTS, "bce_continued")


# ----------------------------------------------------------------------------------------------
# Options


@dataclass
class HarnessOptions:
    seeds: list[int]
    out: Path
    variants: list[str]
    val_fraction: float = 0.2
    threads: int = 0
    plots: bool = True
    verbose: bool = False


HARNESS_HELP = f"""usage: {PROG} [--seeds N|S1,S2,...] [--out DIR] [--variants V1,V2,...] [--val-fraction F]
       [--threads N] [--no-plots] [--verbose] [--preset NAME] [--section.key VALUE ...]

Runs the rows of Tables 1 and 3 (variants: {", ".join(VARIANTS)}; default: {",".join(DEFAULT_VARIANTS)})
over several seeds; one phase-1 run per seed is shared by all variants of that seed.

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
    if len(variants) > 1 and cfg.train.gan_epochs < 1:
        raise ConfigError("the GAN variants need --train.gan_epochs >= 1 (selection is among epochs 1..gan_epochs)")
    out = Path(values.get("out") or f"runs/reproduce-{cfg.preset}")
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


def _parse_seeds(text: str) -> list[int]:
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds: expected a count N or a list S1,S2,..., got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds: need at least one seed, no repeats, none negative; got {text!r}")
    return seeds


def _parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    # The baseline is phase 1, which every other row starts from: always run it, first.
    return ["baseline"] + [v for v in dict.fromkeys(names) if v != "baseline"]


# ----------------------------------------------------------------------------------------------
# Split and selection


def carve_validation(num_train: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices) into the training split: a seeded random ``fraction``."""
    num_val = int(round(fraction * num_train))
    if not 0 < num_val < num_train:
        raise ConfigError(f"--val-fraction {fraction} leaves no validation or no fit rows of {num_train}")
    order = np.random.default_rng([VAL_STREAM, seed]).permutation(num_train)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def select_epoch(curve: Sequence[dict[str, Any]], min_epoch: int = 1) -> dict[str, Any] | None:
    """The validation evaluation that the selection rule picks: highest ``SELECTION_KEY`` among
    epochs >= ``min_epoch``, the earliest on ties. ``curve`` holds validation metrics only."""
    best = None
    for point in curve:
        if point["epoch"] < min_epoch:
            continue
        if best is None or point[SELECTION_KEY] > best[SELECTION_KEY]:
            best = point
    return best


class SelectingTrainer(Trainer):
    """A Trainer that keeps its validation curve and the state at the selected epoch.

    ``Trainer`` evaluates on ``splits.val`` at the end of every ``eval_every``-th epoch (after
    counting it) and of each phase; that is the hook. ``keep="phase1"`` snapshots everything
    ``start_from_baseline`` needs; ``keep="generator"`` only G's weights. ``adversarial=False``
    makes phase 2 the control: the same G steps on L_logistic alone, D never trained.
    """

    def __init__(self, *args, keep: str, adversarial: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep = keep
        self.adversarial = adversarial
        self.curve: list[dict[str, Any]] = []
        self.selected: dict[str, Any] | None = None
        self.selected_state: dict[str, Any] | None = None

    def evaluate(self) -> dict[str, Any]:
        metrics = super().evaluate()
        point = {"phase": self.phase, "epoch": self.epoch, **metrics}
        self.curve.append(point)
        min_epoch = 1 if (self.phase == "gan" or self.cfg.train.bce_epochs > 0) else 0
        best = select_epoch([p for p in self.curve if p["phase"] == self.phase], min_epoch)
        if best is point:
            self.selected = point
            if self.keep == "phase1":
                state = copy.deepcopy(self.state_dict())
                state["baseline_metrics"] = metrics
                self.selected_state = state
            else:
                self.selected_state = copy.deepcopy(self.generator.state_dict())
        return metrics

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.adversarial:
            return super().train_step(batch)
        # The control: the G updates of phase 2 on L_logistic alone, on the images the G updates
        # would see (the D updates' batches are drawn and left unused).
        g = self.layout.generator_rows()
        return self.bce_step({k: v[g] for k, v in batch.items()})  # opt_g is at g_lr in phase 2


# ----------------------------------------------------------------------------------------------
# Runs


@contextlib.contextmanager
def _run_log(path: Path, verbose: bool):
    """Send the trainer's progress bars, table and per-epoch log to ``path`` (and stdout if verbose)."""
    if verbose:
        yield
        return
    trainer_logger = logging.getLogger("fastmlgan")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    saved = trainer_logger.propagate
    trainer_logger.addHandler(handler)
    trainer_logger.propagate = False
    try:
        with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield
    finally:
        trainer_logger.removeHandler(handler)
        handler.close()
        trainer_logger.propagate = saved


def _with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    d = cfg.to_dict()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section in d and isinstance(d[section], dict):
            d[section][name] = value
        else:
            d[key] = value
    return config_from_dict(d)


def _predict_on(trainer, split) -> tuple[np.ndarray, np.ndarray]:
    """σ(G(x)) and targets on ``split``, preprocessed as the trainer's data (features are
    standardised with the statistics of its training split)."""
    from fastmlgan.loaders.registry import Splits, build_loaders

    _, loader = build_loaders(
        trainer.cfg.data, Splits(trainer.splits.train, split), trainer.info, trainer.cfg.train.seed
    )
    saved = trainer.eval_loader
    trainer.eval_loader = loader
    try:
        return trainer.predict()
    finally:
        trainer.eval_loader = saved


@torch.no_grad()
def discriminator_diagnostics(trainer) -> dict[str, float]:
    """Mean critic scores on the validation split at the end of phase 2: real label sets, G's
    relaxed samples (what D is trained on), the same samples thresholded at 0.5, and another
    image's real label set (the batch rolled by one). ``softness_gap`` = D(hard) − D(relaxed) is
    how much D rewards a sample only for being binary; ``dependency_gap`` = D(real) − D(hard) what
    is left for the label sets themselves. ``sample_softness``: mean min(ŷ, 1 − ŷ) of the samples."""
    from fastmlgan.losses import sample_label_sets

    generator, discriminator, f_ext = trainer.generator, trainer.discriminator, trainer.feature_extractor
    generator.eval()
    sums = {"real": 0.0, "generated": 0.0, "generated_hard": 0.0, "mismatched": 0.0, "sample_softness": 0.0}
    count = 0
    for batch in trainer.eval_loader:
        x = batch["image"].to(trainer.device)
        y = batch["labels"].to(trainer.device).float()
        fake = sample_label_sets(generator(x).float(), trainer.spec)
        z = f_ext(x).float() if trainer.spec.conditional else None
        for name, labels in (
            ("real", y),
            ("generated", fake),
            ("generated_hard", (fake > 0.5).float()),
            ("mismatched", y.roll(1, dims=0)),
        ):
            sums[name] += float(discriminator(labels, z).sum())
        sums["sample_softness"] += float(torch.minimum(fake, 1.0 - fake).mean(dim=1).sum())
        count += len(y)
    generator.train()
    out = {f"D_{k}" if k != "sample_softness" else k: v / max(count, 1) for k, v in sums.items()}
    out["softness_gap"] = out["D_generated_hard"] - out["D_generated"]
    out["dependency_gap"] = out["D_real"] - out["D_generated_hard"]
    with torch.enable_grad():
        out.update(gradient_share(trainer))
    return out


def gradient_share(trainer, num_batches: int = 4) -> dict[str, float]:
    """How much of G's phase-2 update D contributes (eq. 2): the ratio of the norms of ∇θ L_G and
    ∇θ α·L_logistic over G's parameters, and their cosine, on the first ``num_batches`` training
    batches at the end of phase 2 (G in eval mode, so BatchNorm statistics stay untouched)."""
    from fastmlgan.losses import logistic_loss, sample_label_sets

    generator, discriminator, f_ext = trainer.generator, trainer.discriminator, trainer.feature_extractor
    params = [p for p in generator.parameters() if p.requires_grad]
    generator.eval()
    ratios, cosines = [], []
    for i, batch in enumerate(trainer.train_loader):
        if i >= num_batches:
            break
        x = batch["image"].to(trainer.device)
        logits = generator(x).float()
        bce = trainer.spec.bce_weight * logistic_loss(logits, batch["labels"].to(trainer.device))
        z = f_ext(x).float() if trainer.spec.conditional else None
        adversarial = -discriminator(sample_label_sets(logits, trainer.spec), z).mean()
        g_bce = torch.autograd.grad(bce, params, retain_graph=True, allow_unused=True)
        g_adv = torch.autograd.grad(adversarial, params, allow_unused=True)
        pairs = [(a, b) for a, b in zip(g_adv, g_bce) if b is not None]
        flat_bce = torch.cat([b.flatten() for _, b in pairs])
        flat_adv = torch.cat([(a if a is not None else torch.zeros_like(b)).flatten() for a, b in pairs])
        ratios.append(float(flat_adv.norm() / flat_bce.norm().clamp_min(1e-12)))
        cosines.append(float(torch.nn.functional.cosine_similarity(flat_adv, flat_bce, dim=0)))
    generator.train()
    if not ratios:
        return {}
    return {"grad_ratio_adv_to_bce": float(np.mean(ratios)), "grad_cosine_adv_bce": float(np.mean(cosines))}


def summarize_d_log(metrics_jsonl: Path) -> dict[str, dict[str, float]]:
    """Means of the logged phase-2 losses over the first and the last quarter of the logged steps
    (how D and G evolved: a collapsed critic has ``wasserstein`` ≈ 0 and ``gp`` ≈ 1 or ≈ 0)."""
    if not metrics_jsonl.is_file():
        return {}
    steps = []
    for line in metrics_jsonl.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("phase") == "gan" and "loss_d" in record:
            steps.append(record)
    if not steps:
        return {}
    quarter = max(1, len(steps) // 4)
    out: dict[str, dict[str, float]] = {"num_logged": {"all": float(len(steps))}}
    for key in D_LOG_KEYS:
        values = [s[key] for s in steps if key in s]
        if values:
            out[key] = {
                "first_quarter": float(np.mean(values[:quarter])),
                "last_quarter": float(np.mean(values[-quarter:])),
            }
    return out


class Harness:
    """Runs (seed, variant) rows, appending each finished one to ``results.jsonl``."""

    def __init__(self, opts: HarnessOptions, cfg: Config, argv: Sequence[str]) -> None:
        self.opts = opts
        self.cfg = cfg
        self.argv = list(argv)
        self.out = opts.out
        self.runs = self.out / "runs"
        self.records_path = self.out / "results.jsonl"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.info = DistInfo(0, 1, 0, self.device)
        self.t_start = time.perf_counter()
        self.git = git_revision()
        self.run_seconds: list[float] = []

    # -- bookkeeping ---------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """What a finished row depends on: the config (less seed and run folder) and the split."""
        d = self.cfg.to_dict()
        d["train"].pop("seed", None)
        for key in ("out", "resume"):
            d.pop(key, None)
        return {"config": d, "val_fraction": self.opts.val_fraction, "val_stream": VAL_STREAM}

    def _check_identity(self) -> None:
        path = self.out / "harness.json"
        current = self._identity()
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != current:
                diff = _dict_diff(saved, current)
                raise ConfigError(
                    f"{self.out} holds results of another configuration ({'; '.join(diff[:6])}); "
                    "use another --out, or delete the folder to start over"
                )
        else:
            path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
        gitignore = self.out / ".gitignore"
        if not gitignore.exists():
            gitignore.write_text("# per-run logs, checkpoints and scores; results.* and *.png are the record\nruns/\n")

    def load_records(self) -> dict[tuple[int, str], dict[str, Any]]:
        records: dict[tuple[int, str], dict[str, Any]] = {}
        if not self.records_path.is_file():
            return records
        for n, line in enumerate(self.records_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning(
                    "%s:%d: unreadable line (an interrupted write?); that row will be rerun", self.records_path, n
                )
                continue
            variant = VARIANTS.get(record.get("variant"))
            if (
                variant is None
                or record.get("overrides") != variant.overrides
                or record.get("adversarial", True) != variant.adversarial
            ):
                logger.warning(
                    "%s:%d: row of an unknown or changed variant %r; ignored",
                    self.records_path,
                    n,
                    record.get("variant"),
                )
                continue
            records[(record["seed"], record["variant"])] = record
        return records

    def _append(self, record: dict[str, Any]) -> None:
        # A crash mid-write leaves a line without its newline: start on a fresh line after it.
        torn = self.records_path.is_file() and not self.records_path.read_bytes().endswith(b"\n")
        torn = torn and self.records_path.stat().st_size > 0
        with open(self.records_path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _progress(self, message: str, remaining: int) -> None:
        elapsed = time.perf_counter() - self.t_start
        eta = ""
        if self.run_seconds and remaining:
            eta = f", ETA {_duration(np.mean(self.run_seconds) * remaining)}"
        print(f"[{_duration(elapsed)}] {message} ({remaining} runs left{eta})", flush=True)

    # -- the runs ------------------------------------------------------------------------------

    def _splits(self, seed: int):
        from fastmlgan.loaders.registry import Splits, build_splits

        full = build_splits(self.cfg.data, self.info)
        fit_idx, val_idx = carve_validation(len(full.train), self.opts.val_fraction, seed)
        fit = full.train.subset(fit_idx, name=f"{full.train.name}-fit")
        val = full.train.subset(val_idx, name=f"{full.train.name}-selection")
        split_info = {
            "train_rows": len(full.train),
            "fit_rows": len(fit_idx),
            "val_rows": len(val_idx),
            "test_rows": len(full.val),
            "val_indices_sha": _index_digest(val_idx),
        }
        return Splits(fit, val), full.val, split_info

    def _fresh_dir(self, path: Path) -> Path:
        if path.exists():  # an unfinished run of an earlier invocation: start it over
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def run_phase1(self, seed: int, splits, test, split_info) -> tuple[dict[str, Any], dict[str, Any]]:
        run_dir = self._fresh_dir(self.runs / f"seed{seed}" / "baseline")
        cfg = _with_overrides(
            self.cfg, {"gan.enable": False, "train.seed": seed, "checkpoint.enable": False, "out": str(run_dir)}
        )
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        t0 = time.perf_counter()
        with _run_log(run_dir / "train.log", self.opts.verbose):
            trainer = SelectingTrainer(cfg, self.info, run_dir, splits, keep="phase1")
            trainer.fit()
            state = trainer.selected_state
            trainer.generator.load_state_dict(state["generator"])
            scores, targets = _predict_on(trainer, test)
        (run_dir / ckpt.CHECKPOINT_DIR / "baseline.pt").unlink(missing_ok=True)  # the last epoch; not the selected one
        ckpt.save_atomic(state, run_dir / "selected.pt")
        record = self._record(seed, "baseline", cfg, trainer, scores, targets, split_info, time.perf_counter() - t0)
        record["selected_epochs"] = {"bce": trainer.selected["epoch"]}
        np.savez_compressed(run_dir / "test_scores.npz", scores=scores, targets=targets)
        del trainer
        gc.collect()
        return record, state

    def run_variant(self, seed: int, name: str, splits, test, split_info, phase1: dict[str, Any]) -> dict[str, Any]:
        variant = VARIANTS[name]
        run_dir = self._fresh_dir(self.runs / f"seed{seed}" / name)
        cfg = _with_overrides(
            self.cfg,
            {
                **variant.overrides,
                "gan.enable": True,
                "train.seed": seed,
                "checkpoint.enable": False,
                "out": str(run_dir),
            },
        )
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        t0 = time.perf_counter()
        with _run_log(run_dir / "train.log", self.opts.verbose):
            trainer = SelectingTrainer(
                cfg, self.info, run_dir, splits, keep="generator", adversarial=variant.adversarial
            )
            # A copy: Optimizer.load_state_dict keeps the given moment tensors (no copy when dtype
            # and device match) and Adam updates them in place, so without it each row would start
            # from the optimizer state the previous row of this seed left behind.
            trainer.start_from_baseline(copy.deepcopy(phase1))
            trainer.fit()
            diagnostics = discriminator_diagnostics(trainer) if variant.adversarial else {}
            trainer.generator.load_state_dict(trainer.selected_state)
            scores, targets = _predict_on(trainer, test)
        record = self._record(seed, name, cfg, trainer, scores, targets, split_info, time.perf_counter() - t0)
        record["selected_epochs"] = {"bce": phase1["epoch"], "gan": trainer.selected["epoch"]}
        record["d_log"] = summarize_d_log(run_dir / "metrics.jsonl")
        record["d_diagnostics"] = diagnostics
        np.savez_compressed(run_dir / "test_scores.npz", scores=scores, targets=targets)
        del trainer
        gc.collect()
        return record

    def _record(self, seed, name, cfg, trainer, scores, targets, split_info, wall_s) -> dict[str, Any]:
        curve_keys = ("C-F1", "O-F1", "mAP", "avg_labels")
        phase = "bce" if name == "baseline" else "gan"
        return {
            "seed": seed,
            "variant": name,
            "overrides": VARIANTS[name].overrides,
            "adversarial": VARIANTS[name].adversarial,
            "config": cfg.to_dict(),
            "split": split_info,
            "val": _strip(trainer.selected),
            "val_curve": [
                [p["epoch"], *[round(p[k], 4) for k in curve_keys]] for p in trainer.curve if p["phase"] == phase
            ],
            "val_curve_keys": ["epoch", *curve_keys],
            "test": compute_metrics(scores, targets),
            "test_true_labels_per_image": float(np.asarray(targets).sum(axis=1).mean()),
            "wall_s": round(wall_s, 2),
            "git": self.git,
        }

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_identity()
        records = self.load_records()
        todo = [(s, v) for s in self.opts.seeds for v in self.opts.variants if (s, v) not in records]
        skipped = len(self.opts.seeds) * len(self.opts.variants) - len(todo)
        print(
            f"reproduce: {len(self.opts.seeds)} seeds x {len(self.opts.variants)} rows "
            f"({', '.join(self.opts.variants)}) into {self.out}; {skipped} finished rows found, {len(todo)} to run",
            flush=True,
        )
        remaining = len(todo)
        for seed in self.opts.seeds:
            missing = [v for v in self.opts.variants if (seed, v) not in records]
            if not missing:
                continue
            splits, test, split_info = self._splits(seed)
            phase1_path = self.runs / f"seed{seed}" / "baseline" / "selected.pt"
            if (seed, "baseline") in records and phase1_path.is_file():
                phase1 = torch.load(phase1_path, map_location="cpu", weights_only=True)
            else:
                record, phase1 = self.run_phase1(seed, splits, test, split_info)
                if (seed, "baseline") not in records:
                    self._append(record)
                    records[(seed, "baseline")] = record
                    remaining -= 1
                    self.run_seconds.append(record["wall_s"])
                    self._progress(_describe(record), remaining)
            for name in missing:
                if name == "baseline":
                    continue
                record = self.run_variant(seed, name, splits, test, split_info, phase1)
                self._append(record)
                records[(seed, name)] = record
                remaining -= 1
                self.run_seconds.append(record["wall_s"])
                self._progress(_describe(record), remaining)
        results = summarize(records, self.opts, self.cfg)
        results["command"] = f"{PROG} {shlex.join(self.argv)}"
        results["environment"] = environment(self.device)
        unrecorded = "not recorded (rows older than per-row recording)"
        results["row_revisions"] = sorted({r.get("git", unrecorded) for r in _selected_records(records, self.opts)})
        results["wall_s"] = {
            "this_invocation": round(time.perf_counter() - self.t_start, 1),
            "sum_of_rows": round(sum(r["wall_s"] for r in _selected_records(records, self.opts)), 1),
        }
        if self.opts.plots:
            results["plots"] = self._plots(results)
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (self.out / "results.md").write_text(render_markdown(results))
        return results

    def _plots(self, results: dict[str, Any]) -> dict[str, str]:
        try:
            from fastmlgan import plots
        except ImportError as e:  # matplotlib is in the dev extra only
            logger.warning("no plots: %s (pip install matplotlib)", e)
            return {}
        scores = {}
        for seed in self.opts.seeds:
            files = {v: self.runs / f"seed{seed}" / v / "test_scores.npz" for v in ("baseline", "wgan")}
            if all(f.is_file() for f in files.values()):
                scores = {v: np.load(f) for v, f in files.items()}
                scores_seed = seed
                break
        written = plots.write_plots(results, self.out)
        if scores:
            from fastmlgan.loaders.registry import build_splits

            class_names = build_splits(self.cfg.data, self.info).class_names
            name = plots.plot_cooccurrence(
                scores["baseline"]["targets"],
                {"baseline": scores["baseline"]["scores"], "+ WGAN-gp": scores["wgan"]["scores"]},
                class_names,
                self.out / "cooccurrence.png",
                title=f"test split, seed {scores_seed}",
            )
            written["cooccurrence"] = name
        return written


# ----------------------------------------------------------------------------------------------
# Aggregation


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Every numeric metric key; nested ones (top3) as ``top3/C-P``."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}/{sub}"] = float(v)
        elif isinstance(value, (int, float)):
            flat[key] = float(value)
    return flat


def mean_std(per_seed: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation over seeds (``np.std``, ddof=0) of every key."""
    mean = {k: float(np.mean(v)) for k, v in per_seed.items()}
    std = {k: float(np.std(v)) for k, v in per_seed.items()}
    return mean, std


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a − b paired by seed: mean, sample SD (ddof=1), standard error SD/√n, and whether |mean|
    exceeds two standard errors (undefined for n < 2)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    out: dict[str, Any] = {"n": n, "mean": float(d.mean()) if n else None, "per_seed": d.tolist()}
    if n < 2:
        out.update(sd=None, se=None, exceeds_2se=None)
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    out.update(sd=sd, se=se, exceeds_2se=bool(abs(out["mean"]) > 2 * se))
    return out


def _selected_records(records, opts) -> list[dict[str, Any]]:
    return [records[(s, v)] for s in opts.seeds for v in opts.variants if (s, v) in records]


def summarize(records: dict[tuple[int, str], dict[str, Any]], opts: HarnessOptions, cfg: Config) -> dict[str, Any]:
    """results.json: per variant the mean/std/per-seed of every test (and validation) metric,
    the selected epochs, paired differences and D's logs."""
    variants: dict[str, Any] = {}
    for name in opts.variants:
        rows = [(s, records[(s, name)]) for s in opts.seeds if (s, name) in records]
        if not rows:
            continue
        seeds = [s for s, _ in rows]
        entry: dict[str, Any] = {
            "label": VARIANTS[name].label,
            "table3": VARIANTS[name].table3,
            "overrides": VARIANTS[name].overrides,
            "config": rows[0][1]["config"],
            "seeds": seeds,
        }
        for split in ("test", "val"):
            flat = [flatten_metrics(r[split]) for _, r in rows]
            keys = [k for k in flat[0] if all(k in f for f in flat)]
            per_seed = {k: [f[k] for f in flat] for k in keys}
            mean, std = mean_std(per_seed)
            entry[split] = {"mean": mean, "std": std, "per_seed": per_seed}
        entry["selected_epochs"] = {
            phase: [r["selected_epochs"].get(phase) for _, r in rows]
            for phase in ("bce", "gan")
            if phase in rows[0][1]["selected_epochs"]
        }
        entry["test_true_labels_per_image"] = float(np.mean([r["test_true_labels_per_image"] for _, r in rows]))
        entry["wall_s"] = float(sum(r["wall_s"] for _, r in rows))
        if name != "baseline" and VARIANTS[name].adversarial:
            entry["d_log"] = _mean_nested([r.get("d_log", {}) for _, r in rows])
            entry["d_diagnostics"] = _mean_nested([r.get("d_diagnostics", {}) for _, r in rows])
        variants[name] = entry
    for name, entry in variants.items():
        for ref in _references(name):
            if ref not in variants:
                continue
            common = [s for s in entry["seeds"] if s in variants[ref]["seeds"]]
            a = {s: records[(s, name)] for s in common}
            b = {s: records[(s, ref)] for s in common}
            entry[f"diff_vs_{ref}"] = {
                k: paired_difference([a[s]["test"][k] for s in common], [b[s]["test"][k] for s in common])
                for k in DIFF_KEYS
            }
    any_record = next(iter(_selected_records(records, opts)), None)
    return {
        "dataset": _dataset_name(cfg),
        "preset": cfg.preset,
        "seeds": opts.seeds,
        "protocol": {
            "val_fraction": opts.val_fraction,
            "split": (
                f"per seed s, {opts.val_fraction:.0%} of the training split drawn with "
                f"numpy.random.default_rng([{VAL_STREAM}, s]) is the validation split; G and D train on "
                "the rest; the config's evaluation split is the test split, read once per row after selection"
            ),
            "split_sizes": any_record["split"] if any_record else None,
            "selection_rule": SELECTION_RULE,
            "std": "standard deviation over seeds, np.std (ddof=0)",
            "paired_difference": "variant − reference per seed (same seed = same split and phase 1); "
            "SE = sample SD (ddof=1) / sqrt(n); 'exceeds 2 SE' when |mean| > 2 SE",
        },
        "config": cfg.to_dict(),
        "variants": variants,
    }


def _references(name: str) -> list[str]:
    """The rows a row is compared with: the baseline; + WGAN-gp for the ablations and the control;
    the control for every GAN row."""
    if name == "baseline":
        return []
    refs = ["baseline"]
    if name != "wgan":
        refs.append("wgan")
    if VARIANTS[name].adversarial:
        refs.append("bce_continued")
    return refs


def _mean_nested(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise mean of nested dicts of numbers (keys present in every dict)."""
    if not dicts or not all(dicts):
        return {}
    out: dict[str, Any] = {}
    for key in dicts[0]:
        values = [d.get(key) for d in dicts]
        if any(v is None for v in values):
            continue
        if isinstance(values[0], dict):
            out[key] = _mean_nested(values)
        else:
            out[key] = float(np.mean(values))
    return out


def _dataset_name(cfg: Config) -> str:
    if cfg.data.dataset == "features":
        return Path(cfg.data.features_train).stem.replace("-train", "")
    return cfg.data.dataset


# ----------------------------------------------------------------------------------------------
# results.md


def _pm(entry: dict[str, Any], key: str, decimals: int, split: str = "test") -> str:
    m, s = entry[split]["mean"].get(key), entry[split]["std"].get(key)
    if m is None:
        return "-"
    return f"{m:.{decimals}f} ± {s:.{decimals}f}"


def _diff_cell(diff: dict[str, Any] | None, decimals: int = 2) -> str:
    if not diff or diff.get("mean") is None:
        return "-"
    if diff["se"] is None:
        return f"{diff['mean']:+.{decimals}f}"
    mark = " **>2SE**" if diff["exceeds_2se"] else ""
    return f"{diff['mean']:+.{decimals}f} ± {diff['se']:.{decimals}f}{mark}"


def render_markdown(results: dict[str, Any]) -> str:
    v = results["variants"]
    n_seeds = len(results["seeds"])
    env = results.get("environment", {})
    proto = results["protocol"]
    sizes = proto.get("split_sizes") or {}
    lines = [
        f"# {results['dataset']}: Tables 1 and 3 over {n_seeds} seeds",
        "",
        f"Test split ({sizes.get('test_rows', '?')} rows), mean ± standard deviation over seeds "
        f"{', '.join(map(str, results['seeds']))} (np.std, ddof=0). Written by `fastmlgan.reproduce`.",
        "",
        "## Table 1 layout",
        "",
        "| Methods | C-P | C-R | C-F1 | O-P | O-R | O-F1 | mAP | labels/img |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, entry in v.items():
        cells = [_pm(entry, k, 2 if k == "avg_labels" else 1) for k in TABLE_KEYS]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    if "baseline" in v:
        lines.append(
            f"| (true labels/img of the test split: {v['baseline']['test_true_labels_per_image']:.2f}) |" + " |" * 8
        )
    lines += [
        "",
        "## Table 3 layout",
        "",
        "| | Methods | C-F1 | O-F1 | ΔC-F1 vs (a) | ΔO-F1 vs (a) | ΔC-F1 vs (b) | ΔO-F1 vs (b) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, entry in v.items():
        vs_a, vs_b = entry.get("diff_vs_baseline", {}), entry.get("diff_vs_wgan", {})
        lines.append(
            f"| {entry['table3']} | {entry['label']} | {_pm(entry, 'C-F1', 1)} | {_pm(entry, 'O-F1', 1)} | "
            f"{_diff_cell(vs_a.get('C-F1'))} | {_diff_cell(vs_a.get('O-F1'))} | "
            f"{_diff_cell(vs_b.get('C-F1'))} | {_diff_cell(vs_b.get('O-F1'))} |"
        )
    lines += [
        "",
        f"Δ: paired by seed (each seed's rows share one split and one phase-1 run; n = {n_seeds}), mean ± "
        "standard error (sample SD / √n); **>2SE** marks a difference larger than two standard errors.",
    ]
    control_rows = [(name, e) for name, e in v.items() if "diff_vs_bce_continued" in e]
    if control_rows:
        lines += [
            "",
            "## GAN rows against the control (the same phase-2 G steps on L_logistic alone, no D)",
            "",
            "| Methods | ΔC-F1 | ΔO-F1 | ΔmAP | Δlabels/img |",
            "|---|---|---|---|---|",
        ]
        for _, entry in control_rows:
            diff = entry["diff_vs_bce_continued"]
            cells = [_diff_cell(diff[k]) for k in ("C-F1", "O-F1", "mAP", "avg_labels")]
            lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired differences to the baseline, all Table 1 keys",
        "",
        "| Methods | " + " | ".join(f"Δ{k}" for k in DIFF_KEYS) + " |",
        "|---|" + "---|" * len(DIFF_KEYS),
    ]
    for _, entry in v.items():
        if "diff_vs_baseline" in entry:
            lines.append(
                f"| {entry['label']} | "
                + " | ".join(_diff_cell(entry["diff_vs_baseline"][k]) for k in DIFF_KEYS)
                + " |"
            )
    lines += [
        "",
        "## Top-3 labels per image (the CNN-RNN convention of Tables 1-2)",
        "",
        "| Methods | " + " | ".join(PRF_KEYS) + " |",
        "|---|" + "---|" * len(PRF_KEYS),
    ]
    for _, entry in v.items():
        lines.append(f"| {entry['label']} | " + " | ".join(_pm(entry, f"top3/{k}", 1) for k in PRF_KEYS) + " |")
    lines += [
        "",
        "## Selection (validation split)",
        "",
        "| Methods | val C-F1 | val O-F1 | phase-1 epochs | GAN epochs | test cooc_dist |",
        "|---|---|---|---|---|---|",
    ]
    for _, entry in v.items():
        sel = entry["selected_epochs"]
        lines.append(
            f"| {entry['label']} | {_pm(entry, 'C-F1', 1, 'val')} | {_pm(entry, 'O-F1', 1, 'val')} | "
            f"{_list(sel.get('bce'))} | {_list(sel.get('gan'))} | {_pm(entry, 'cooc_dist', 3)} |"
        )
    d_rows = [(name, e) for name, e in v.items() if e.get("d_log")]
    if d_rows:
        lines += [
            "",
            "## The critic (phase-2 logs, mean over seeds; first → last quarter of the logged steps)",
            "",
            "| Methods | wasserstein | gp | d_matched | d_generated | d_mismatched | g_adversarial |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, entry in d_rows:
            keys = ("wasserstein", "gp", "d_matched", "d_generated", "d_mismatched", "g_adversarial")
            lines.append(f"| {entry['label']} | " + " | ".join(_trend(entry["d_log"], k) for k in keys) + " |")
        lines += [
            "",
            "Critic scores on the validation split at the end of phase 2 (mean over seeds): real label sets, G's "
            "relaxed samples, the same samples thresholded at 0.5, another image's label set. softness gap = "
            "D(hard) − D(relaxed): what D pays a sample only for being binary; dependency gap = D(real) − D(hard). "
            "‖∇L_G‖/‖∇αL_log‖ and cos: the adversarial and the α-weighted BCE gradients of G's parameters on "
            "four training batches at the end of phase 2 (their norm ratio and cosine; '-' for rows run before "
            "this was recorded).",
            "",
            "| Methods | D(real) | D(relaxed) | D(hard) | D(mismatched) | softness gap | dependency gap "
            "| sample softness | ‖∇L_G‖/‖∇αL_log‖ | cos |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, entry in d_rows:
            d = entry.get("d_diagnostics") or {}
            keys = (
                "D_real",
                "D_generated",
                "D_generated_hard",
                "D_mismatched",
                "softness_gap",
                "dependency_gap",
                "sample_softness",
                "grad_ratio_adv_to_bce",
                "grad_cosine_adv_bce",
            )
            lines.append(f"| {entry['label']} | " + " | ".join(f"{d[k]:.3f}" if k in d else "-" for k in keys) + " |")
    plots = results.get("plots") or {}
    if plots:
        lines += ["", "## Plots", ""]
        for key, file in plots.items():
            lines.append(f"![{key}]({file})")
            lines.append("")
    lines += [
        "",
        "## Protocol",
        "",
        f"- Split: {proto['split']}. Sizes: "
        + ", ".join(f"{k} {val}" for k, val in sizes.items() if k.endswith("rows"))
        + ".",
        f"- Selection: {proto['selection_rule']}.",
        f"- Differences: {proto['paired_difference']}.",
        f"- Epoch budget: phase 1 up to {results['config']['train']['bce_epochs']}, phase 2 up to "
        f"{results['config']['train']['gan_epochs']} epochs, evaluated every {results['config']['train']['eval_every']}.",
        "",
        "## Run",
        "",
        f"- Command: `{results.get('command', '')}`",
        f"- Wall time: {_duration(results.get('wall_s', {}).get('sum_of_rows', 0))} summed over the rows "
        f"({_duration(results.get('wall_s', {}).get('this_invocation', 0))} this invocation)",
        f"- Device: {env.get('device', '?')}, {env.get('threads', '?')} torch threads",
        f"- Versions: fastmlgan {env.get('fastmlgan', '?')}, torch {env.get('torch', '?')}, numpy {env.get('numpy', '?')}, "
        f"python {env.get('python', '?')}",
        f"- Git revision: {env.get('git', '?')} (this invocation); revision of the rows: "
        f"{', '.join(results.get('row_revisions', [])) or '?'}",
        "",
        "The full config (resolved options) of every row is in `results.json`.",
        "",
    ]
    return "\n".join(lines)


def _trend(log: dict[str, Any], key: str) -> str:
    if key not in log:
        return "-"
    return f"{log[key]['first_quarter']:.3f} → {log[key]['last_quarter']:.3f}"


def _list(values: Iterable | None) -> str:
    if not values:
        return "-"
    values = list(values)
    return f"{np.mean(values):.1f} ({', '.join(str(v) for v in values)})"


# ----------------------------------------------------------------------------------------------
# Environment


def git_revision() -> str:
    """HEAD, marked when tracked files or the package itself (new files included) differ from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10).stdout

    try:
        rev = git("rev-parse", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no") + git(
            "status", "--porcelain", "--untracked-files=all", "--", "fastmlgan"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not rev:
        return "unknown"
    return rev + (" (with uncommitted changes)" if dirty.strip() else "")


def environment(device: torch.device) -> dict[str, Any]:
    git = git_revision()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": f"{device.type} ({name})",
        "threads": torch.get_num_threads(),
        "fastmlgan": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "git": git,
    }


# ----------------------------------------------------------------------------------------------
# helpers


def _strip(metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if k not in ("phase", "epoch")}


def _describe(record: dict[str, Any]) -> str:
    sel = record["selected_epochs"]
    chosen = f"bce epoch {sel['bce']}" + (f", gan epoch {sel['gan']}" if "gan" in sel else "")
    return (
        f"seed {record['seed']} {record['variant']}: {chosen} (val C-F1 {record['val']['C-F1']:.1f}); "
        f"test C-F1 {record['test']['C-F1']:.1f} O-F1 {record['test']['O-F1']:.1f} "
        f"mAP {record['test']['mAP']:.1f} labels/img {record['test']['avg_labels']:.2f} [{record['wall_s']:.0f}s]"
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _index_digest(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def main(argv: list[str] | None = None) -> int:
    from fastmlgan.progress import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = parse_harness_args(argv)
        if parsed is None:
            return 0
        opts, cfg = parsed
        setup_logging(True)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        results = Harness(opts, cfg, argv).run()
        print((opts.out / "results.md").read_text().split("## Paired differences")[0], flush=True)
        print(f"results: {opts.out / 'results.json'}, {opts.out / 'results.md'}", flush=True)
        return 0 if results["variants"] else 1
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; finished rows are in results.jsonl and a rerun with the same --out skips them",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
