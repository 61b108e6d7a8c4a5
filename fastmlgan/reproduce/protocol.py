"""The protocol: which rows run, how each seed's validation split is carved from the training
split, and which evaluated epoch is selected. Written into ``results.json`` and ``results.md``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmlgan.config import DataConfig
from fastmlgan.data.factory import build_splits
from fastmlgan.data.holdout import VAL_STREAM, carve_validation, hold_out  # noqa: F401 (the harness's names too)
from fastmlgan.data.types import Splits
from fastmlgan.distributed import DistInfo

SELECTION_KEY = "C-F1"
SELECTION_RULE = (
    f"per seed, the evaluated epoch with the highest validation {SELECTION_KEY} (ties: the earliest); "
    "phase 1 among epochs 1..train.bce_epochs (0 when it is 0), phase 2 per variant among epochs "
    "1..train.gan_epochs, evaluated every train.eval_every epochs and at the last"
)


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
    phase1: dict[str, Any] | None = None
    """Config overrides of phase 1, for a row without phase 2 (``overrides`` None): such a row runs
    its own phase 1 instead of the baseline's (``asl``, ``ema``)."""
    start_from: str = "baseline"
    """For a row with phase 2: the phase-1 row whose selected state it starts from; that row's
    ``phase1`` overrides hold in phase 2 too (``asl_wgan``: ASL as L_logistic of eq. 2)."""
    report_ema: bool = False
    """Select and report G's weight average (``--train.ema_decay``) instead of its raw weights."""

    def phase1_overrides(self) -> dict[str, Any]:
        """The overrides of the phase 1 this row is (or starts from); {} for the baseline's."""
        return dict((self.phase1 if self.overrides is None else VARIANTS[self.start_from].phase1) or {})

    def phase1_row(self) -> str:
        """The row whose phase-1 run this row is or starts from."""
        return self.name if self.overrides is None else self.start_from


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
        Variant("bce_weight_3", "+ WGAN-gp, α = 3", "", {"gan.bce_weight": 3.0}),
        # Issue 21's recipes (not in the paper). ASL (Ridnik et al. 2021, its recommended γ− = 4,
        # γ+ = 0, m = 0.05) changes phase 1, so these rows run their own phase 1 per seed.
        Variant("asl", "ASL (no D)", "", None, phase1={"loss.kind": "asl"}),
        Variant("asl_wgan", "ASL + WGAN-gp", "", {}, start_from="asl"),
        # 0.99: phase 1 is 10 (emotions) to 31 (scene) steps an epoch here, so timm's usual 0.9998
        # would still be mostly G's initial weights at the end; with the warm-up (1 − (1 + n)^−2/3)
        # the decay reaches 0.99 only after 1,000 updates.
        Variant("ema", "baseline, weight EMA 0.99", "", None, phase1={"train.ema_decay": 0.99}, report_ema=True),
    )
}
TABLE_VARIANTS = ("baseline", "wgan", "no_negative", "no_conditional", "no_gumbel")
DEFAULT_VARIANTS = (*TABLE_VARIANTS, "bce_continued")
RECIPE_VARIANTS = ("baseline", "wgan", "asl", "asl_wgan", "ema")
"""The rows of docs/results.md's "Which recipe wins" (``--variants`` spells them out)."""


@dataclass
class HarnessOptions:
    """The harness's own options (``fastmlgan.commands.reproduce`` documents them)."""

    seeds: list[int]
    out: Path
    variants: list[str]
    val_fraction: float = 0.2
    threads: int = 0
    plots: bool = True
    verbose: bool = False


# ----------------------------------------------------------------------------------------------
# Split and selection


def seed_splits(data: DataConfig, info: DistInfo, val_fraction: float, seed: int):
    """Seed ``seed``'s splits: (``Splits(fit, validation)``, the test split, their sizes).

    The validation rows come out of the training split (``data.holdout.carve_validation``, the
    rule ``fastmlgan train --data.val_fraction`` uses too); the config's evaluation split is the
    test split, which selection never sees."""
    full = build_splits(data, info)
    fit_test, val, record = hold_out(full, val_fraction, seed, option="--val-fraction")
    split_info = {
        "train_rows": record["train_rows"],
        "fit_rows": record["fit_rows"],
        "val_rows": record["val_rows"],
        "test_rows": len(full.val),
        "val_indices_sha": record["val_indices_sha"],
    }
    return Splits(fit_test.train, val), full.val, split_info


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
