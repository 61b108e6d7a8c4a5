"""``fastmlgan evaluate --checkpoint PATH [--json] [--data.key value ...]`` (also ``python -m
fastmlgan.commands.evaluate``): re-evaluate a checkpoint's generator (by default on the evaluation split it
was trained with).

The threshold is the one the run chose on its validation split (``--data.val_fraction``; its
global threshold) unless ``--threshold`` says otherwise (a number, ``global`` or ``per-class``); a
checkpoint without one is evaluated at 0.5 (one log line says so). ``--weights`` picks a
checkpoint's raw or averaged weights (``--train.ema_decay``; by default those that won on validation).

Output for people and for scripts never mixes: the paper's table goes to stdout, or with
``--json`` one JSON object of every metric goes to stdout and the table to stderr. Log lines
always go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from fastmlgan.classifier import (
    WEIGHT_CHOICES,
    checkpoint_weights,
    generator_from_checkpoint,
    parse_threshold,
    thresholds_for,
)
from fastmlgan.config import build_config, config_from_dict
from fastmlgan.data.factory import build_eval_loader, build_splits
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.logs import setup_logging
from fastmlgan.metrics import compute_metrics, format_table, metrics_at_thresholds
from fastmlgan.safeio import describe_os_error, one_line, stdout_failed
from fastmlgan.scoring import amp_dtype, predict
from fastmlgan.train import checkpoint as ckpt


def checkpoint_scores(path: str, data_overrides: dict[str, str], weights: str = "raw") -> tuple[np.ndarray, np.ndarray]:
    """σ(G(x)) and the targets of every evaluation image of the checkpoint's data (or of the data
    ``data_overrides`` point to), fed exactly as the evaluation during training."""
    state = ckpt.load(path)
    return _scores(state, path, data_overrides, weights)


def _scores(state: dict, path: str, data_overrides: dict[str, str], weights: str) -> tuple[np.ndarray, np.ndarray]:
    saved = config_from_dict(state["config"])
    overrides = {f"data.{k}": v for k, v in saved.to_dict()["data"].items()}
    overrides.update({f"model.{k}": v for k, v in saved.to_dict()["model"].items()})
    overrides["model.pretrained"] = ""  # the checkpoint carries the weights
    overrides["precision.amp"] = saved.precision.amp
    overrides.update(data_overrides)
    cfg = build_config(overrides, preset=saved.preset)
    info = DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    splits = build_splits(cfg.data, info)
    if list(splits.class_names) != list(state["class_names"]):
        raise FastMLGANError(
            f"{path}: the checkpoint has {len(state['class_names'])} classes, the data "
            f"{len(splits.class_names)} (or in another order); evaluate on data with the same categories"
        )
    # The evaluation split alone: a decoded-image cache of the training split is not needed (or built).
    eval_loader = build_eval_loader(cfg.data, splits, info, cfg.train.seed)
    generator = generator_from_checkpoint(state, str(path), weights).to(info.device)
    # The same precision as the evaluation during training.
    return predict(generator, eval_loader, info.device, amp_dtype(cfg.precision.amp, info.device))


def evaluate_checkpoint(path: str, data_overrides: dict[str, str], threshold: float | str | None = 0.5,
                        weights: str = "auto") -> tuple[dict, str]:
    """(the metrics, the threshold's description) at ``threshold`` (``classifier.parse_threshold``:
    None is the run's stored default)."""
    state = ckpt.load(path)
    _, name, stored = checkpoint_weights(state, weights, str(path))
    t, described = thresholds_for(threshold, stored, len(state["class_names"]), str(path))
    scores, targets = _scores(state, path, data_overrides, name)
    metrics = compute_metrics(scores, targets, float(t[0])) if (t == t[0]).all() else metrics_at_thresholds(scores, targets, t)
    return metrics, f"{name} weights, threshold {described}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except FastMLGANError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # standard output full, or a file of the data changed under the run
        print(stdout_failed(e) if e.filename is None else f"error: {e.filename}: {describe_os_error(e)}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    parser = _Parser(
        prog="fastmlgan evaluate",
        description="Re-evaluate a checkpoint's generator. The table goes to stdout; with --json, one JSON "
        "object goes to stdout and the table to stderr. Other data: --data.KEY VALUE (same categories).",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file or a run directory")
    parser.add_argument("--threshold", default=None, help="predict a label when its score > threshold: a number in [0, 1], "
                        "global or per-class (chosen on the run's validation split); default: the run's global one, else 0.5")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="auto (default: those that won on validation) | raw | ema (--train.ema_decay)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    args, rest = parser.parse_known_args(argv)
    threshold = parse_threshold(args.threshold)
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        key, eq, value = rest[i].partition("=")
        if not key.startswith("--data."):
            parser.error(f"unexpected argument {rest[i]!r}: only --data.key value overrides are accepted")
        if not eq:
            if i + 1 >= len(rest):
                parser.error(f"{key} needs a value")
            value = rest[i + 1]
            i += 1
        overrides[key[2:]] = value
        i += 1
    # Log lines on stderr: stdout holds the result only.
    setup_logging(stream="stderr")
    metrics, described = evaluate_checkpoint(args.checkpoint, overrides, threshold, args.weights)
    table = format_table({"checkpoint": metrics}, title=f"{args.checkpoint} ({described})")
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(metrics), flush=True)
    else:
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
