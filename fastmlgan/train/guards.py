"""Guards on the logged losses: a non-finite or exploding loss stops training with a message that
names the phase's learning-rate option and the newest checkpoint a later sound loss verified.

The Trainer calls :meth:`LossGuard.check` once per log step on the values it already moved to the
host (no extra sync), agrees the outcome across ranks, and raises ``FastMLGANError`` with
:func:`lr_hint` and :meth:`LossGuard.good_checkpoint`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["LossGuard", "lr_hint"]

GUARDED_LOSSES = ("bce", "loss_g", "loss_d")
"""The logged losses watched for explosion (every logged value is watched for non-finiteness)."""

HISTORY = 50
"""Log steps in the running median an exploding loss is compared with."""


def lr_hint(phase: str, key: str, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> str:
    """The learning-rate option (and its current value) of the phase and loss that went wrong."""
    if phase == "bce":
        option = "--optim.bce_lr"
    else:
        option = "--optim.d_lr" if key.startswith(("loss_d", "d_", "gp", "wasserstein")) else "--optim.g_lr"
    optimizer = opt_d if option.endswith("d_lr") else opt_g
    return f"Lower {option} (now {optimizer.param_groups[0]['lr']}) or try --precision.amp none."


class LossGuard:
    """Watches the logged losses of one run.

    ``explosion_ratio`` is ``train.loss_explosion_ratio`` (0: off): a guarded loss over that many
    times the running median of its magnitude (per phase, after 3 log steps) is an explosion.
    ``sound_step`` is the last step whose logged losses were sound: a checkpoint written after step
    c is verified by a sound loss at a step > c, since that loss was computed with its weights.
    """

    def __init__(self, explosion_ratio: float) -> None:
        self.explosion_ratio = explosion_ratio
        self.sound_step = 0
        self._history: dict[str, list[float]] = {}

    def check(self, values: dict[str, float], phase: str) -> tuple[str, str]:
        """(the loss, why) when a value is non-finite or a guarded loss exploded, else ("", "")."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            return next(iter(bad)), f"non-finite loss ({bad})"
        return self._explosion(values, phase)

    def mark_sound(self, step: int) -> None:
        self.sound_step = step

    def _explosion(self, values: dict[str, float], phase: str) -> tuple[str, str]:
        ratio = self.explosion_ratio
        if not ratio:
            return "", ""
        for key in GUARDED_LOSSES:
            if key not in values:
                continue
            history = self._history.setdefault(f"{phase}:{key}", [])
            magnitude = abs(values[key])
            if len(history) >= 3:
                median = float(np.median(history[-HISTORY:]))
                if median > 0 and magnitude > ratio * median:
                    return key, (
                        f"exploding loss: {key} = {values[key]:.4g}, over {ratio:g} times its running median "
                        f"{median:.4g} (--train.loss_explosion_ratio)"
                    )
            history.append(magnitude)
        return "", ""

    def good_checkpoint(self, checkpoints: list[tuple[int, Path]]) -> str:
        """The newest checkpoint (of ``(step, path)`` pairs) whose weights a later sound loss
        verified; the ones after it may hold the update that went wrong."""
        verified = [(step, path) for step, path in checkpoints if step < self.sound_step and path.is_file()]
        if verified:
            step, path = verified[-1]
            return f"The last good checkpoint is {path} (step {step}): continue from it with --resume {path}."
        if checkpoints:
            return (
                f"No checkpoint still on disk was verified by a later sound loss (the newest, {checkpoints[-1][1]}, "
                "may hold the bad update; raise --checkpoint.keep to keep more)."
            )
        return "No checkpoint was written before it."
