"""What a run chooses on its validation split at the end of each phase, and what it reports beside
the 0.5 figures.

With ``--data.val_fraction F`` the Trainer trains on the rest of the training split
(``data.holdout``, the rule of ``fastmlgan reproduce``). At the end of phase 1 (the baseline row)
and of phase 2 (the + WGAN-gp row) it scores G on that validation split and picks a global and a
per-class threshold there (``metrics.choose_thresholds``); the test split (the config's evaluation
split) is only evaluated with them, never used to choose. With ``--train.ema_decay`` the average
of G's weights (``train.ema``) is scored the same way beside G's raw weights, and the one with the
higher validation C-F1 at its own global threshold is ``chosen`` (ties: raw); without a validation
split the raw weights are, since nothing else may choose.

A row's record (in ``metrics.json`` under ``selection``, and in every checkpoint)::

    {"weights": {"raw": {"thresholds": {"global": t, "per_class": [...]} | None,
                         "validation_C-F1": {"0.5": .., "global": .., "per_class": ..} | None,
                         "test": {"0.5": metrics, "global": metrics, "per_class": metrics}},
                 "ema": {...}},                        # with --train.ema_decay
     "chosen": "raw" | "ema", "default_threshold": "global"}

``fastmlgan predict``, ``evaluate`` and ``export`` read it (``applicable_row`` says which row's
record belongs to a checkpoint's weights).
"""

from __future__ import annotations

from typing import Any

from fastmlgan.config import Config
from fastmlgan.data.factory import build_eval_loader
from fastmlgan.data.holdout import hold_out
from fastmlgan.data.types import Splits
from fastmlgan.distributed import DistInfo, all_gather_arrays, broadcast_module
from fastmlgan.metrics import choose_thresholds, compute_metrics, metrics_at_thresholds
from fastmlgan.scoring import predict
from fastmlgan.train.steps import TrainingSteps

ROWS = ("baseline", "gan")
DEFAULT_THRESHOLD = "global"
"""The stored threshold predict and evaluate use unless told: one number, the sturdier choice on a
small validation split (a per-class threshold is tuned on a class's few positives)."""


def validation_split(cfg: Config, splits: Splits, own_splits: bool):
    """(``Splits(fit, test)``, (validation split, its record) or None) for ``--data.val_fraction``.
    A caller that brings its own splits (``fastmlgan reproduce``) carves its own: nothing then."""
    if not own_splits or not cfg.data.val_fraction:
        return splits, None
    fit_test, val, record = hold_out(splits, cfg.data.val_fraction, cfg.data.val_seed)
    return fit_test, (val, record)


def applicable_row(state: dict[str, Any]) -> str | None:
    """Which row's record describes the weights of checkpoint ``state``: the + WGAN-gp row's once
    phase 2 is done, the baseline's from the end of phase 1 until phase 2's first step; None in
    the middle of a phase."""
    records = state.get("selection") or {}
    if state.get("phase") == "done" and records.get("gan") is not None:
        return "gan"
    if state.get("phase") in ("gan", "done") and state.get("epoch") == 0 and not state.get("epoch_step"):
        return "baseline" if records.get("baseline") is not None else None
    return None


class Selection:
    """The validation split's loader and the records of the rows finished so far."""

    def __init__(self, cfg: Config, info: DistInfo, splits: Splits, validation, channels_last: bool) -> None:
        self.info = info
        self.validation = None if validation is None else validation[1]
        self.val_loader = None
        if validation is not None:
            self.val_loader = build_eval_loader(cfg.data, Splits(splits.train, validation[0]), info, cfg.train.seed, channels_last)
        self.records: dict[str, Any] = dict.fromkeys(ROWS)

    @classmethod
    def create(cls, cfg: Config, info: DistInfo, splits: Splits, validation, steps: TrainingSteps) -> Selection | None:
        """None when there is nothing to choose or report (no validation split, no EMA): the run
        then writes what it always did."""
        if validation is None and steps.ema is None:
            return None
        return cls(cfg, info, splits, validation, steps.channels_last)

    def finish_phase(self, steps: TrainingSteps, eval_loader, row: str) -> None:
        """Score G's raw (and averaged) weights on the validation and test splits, choose, record."""
        broadcast_module(steps.generator, buffers_only=True)  # rank 0's BatchNorm statistics, as Trainer.predict
        candidates = {"raw": steps.generator}
        if steps.ema is not None:
            steps.ema.sync()
            candidates["ema"] = steps.ema.module
        weights = {}
        for name, module in candidates.items():
            test_scores, test_targets = self._scores(steps, module, eval_loader)
            entry: dict[str, Any] = {"thresholds": None, "validation_C-F1": None}
            entry["test"] = {"0.5": compute_metrics(test_scores, test_targets)}
            if self.val_loader is not None:
                chosen = choose_thresholds(*self._scores(steps, module, self.val_loader))
                entry["thresholds"] = {"global": chosen["global"], "per_class": chosen["per_class"]}
                entry["validation_C-F1"] = chosen["validation_C-F1"]
                entry["test"]["global"] = compute_metrics(test_scores, test_targets, chosen["global"])
                entry["test"]["per_class"] = metrics_at_thresholds(test_scores, test_targets, chosen["per_class"])
            weights[name] = entry
        steps.generator.train()
        self.records[row] = {"weights": weights, "chosen": _winner(weights), "default_threshold": DEFAULT_THRESHOLD}

    def _scores(self, steps: TrainingSteps, module, loader):
        s, t = predict(module, loader, steps.device, steps.amp_dtype, steps.memory_format)
        return all_gather_arrays(s, self.info), all_gather_arrays(t, self.info)

    def state_dict(self) -> dict[str, Any]:
        return {"validation": self.validation, **self.records}

    def load_state_dict(self, state: dict[str, Any] | None, baseline_metrics, gan_metrics) -> None:
        """``*_metrics``: the run's rows as restored (a record of an unfinished row is dropped)."""
        saved = state or {}
        self.records = {row: saved.get(row) for row in ROWS}
        if baseline_metrics is None:
            self.records["baseline"] = None
        if gan_metrics is None:  # phase 2 not finished, or reopened with more epochs
            self.records["gan"] = None


# ----------------------------------------------------------------------------------------------
# The hooks of the Trainer and its checkpointer: one call each, nothing when neither a validation
# split nor EMA is on.


def checkpoint_state(steps: TrainingSteps, selection: Selection | None) -> dict[str, Any]:
    """The checkpoint's ``ema`` (``WeightEma.state_dict``) and ``selection`` (the rows' records)."""
    return {
        "ema": None if steps.ema is None else steps.ema.state_dict(),
        "selection": None if selection is None else selection.state_dict(),
    }


def load_checkpoint_state(steps: TrainingSteps, selection: Selection | None, state: dict[str, Any], baseline_metrics, gan_metrics) -> None:
    """After the rest of the checkpoint (the restored metrics say which records still hold)."""
    if steps.ema is not None:
        steps.ema.load_state_dict(state.get("ema"), steps.generator)
    if selection is not None:
        selection.load_state_dict(state.get("selection"), baseline_metrics, gan_metrics)


def run_results(selection: Selection | None) -> dict[str, Any]:
    """``metrics.json``'s ``selection`` (nothing without a validation split or EMA, so such a run
    writes the same file as before)."""
    return {} if selection is None else {"selection": selection.state_dict()}


def table_rows(selection: Selection | None, names: dict[str, str]) -> dict[str, dict]:
    """The final table's rows beside the 0.5 ones: EMA at 0.5, each weights at its thresholds.
    ``names``: row -> the name of its 0.5 row."""
    rows: dict[str, dict] = {}
    records = {} if selection is None else selection.records
    for row, name in names.items():
        for weights, entry in (records.get(row) or {"weights": {}})["weights"].items():
            label = name + (" (EMA)" if weights == "ema" else "")
            if weights == "ema":
                rows[label] = entry["test"]["0.5"]
            if entry["thresholds"] is not None:
                rows[f"{label} @ {entry['thresholds']['global']:.2f}"] = entry["test"]["global"]
                rows[f"{label} @ per-class"] = entry["test"]["per_class"]
    return rows


def best_on_validation(selection: Selection | None, names: dict[str, str]) -> dict[str, Any] | None:
    """The recipe the validation split prefers among the final table's rows: each row's chosen
    weights (raw or EMA, as ``predict`` loads them) at 0.5, at its global and at its per-class
    thresholds. Chosen without the test split, so it names the run's best recipe honestly; ties
    go to the earlier (the baseline before + WGAN-gp, 0.5 before a tuned threshold). None without
    a validation split. ``{"row", "name" (the table's), "threshold" (predict's --threshold),
    "validation_C-F1"}``."""
    best = None
    records = {} if selection is None else selection.records
    for row, name in names.items():
        record = records.get(row)
        if record is None:
            continue
        entry = record["weights"][record["chosen"]]
        scores = entry["validation_C-F1"]
        if scores is None:
            continue
        label = name + (" (EMA)" if record["chosen"] == "ema" else "")
        for key, suffix, threshold in (("0.5", "", "0.5"), ("global", f" @ {entry['thresholds']['global']:.2f}", "global"),
                                       ("per_class", " @ per-class", "per-class")):
            if best is None or scores[key] > best["validation_C-F1"]:
                best = {"row": row, "name": label + suffix, "threshold": threshold, "validation_C-F1": scores[key]}
    return best


def _winner(weights: dict[str, Any]) -> str:
    """``ema`` when its validation C-F1 at its own global threshold beats the raw weights'."""
    ema, raw = weights.get("ema"), weights["raw"]
    if ema is None or raw["validation_C-F1"] is None:
        return "raw"
    return "ema" if ema["validation_C-F1"]["global"] > raw["validation_C-F1"]["global"] else "raw"
