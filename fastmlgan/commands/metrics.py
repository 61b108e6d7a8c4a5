"""``fastmlgan metrics SCORES.npy TARGETS.npy [--threshold 0.5] [--logits] [--per-class
[--class-names FILE]]``: the metrics of ``fastmlgan.metrics`` for saved predictions, as one JSON
object on stdout; bad input prints ``error: ...`` and exits with status 2.

Classes without a positive target are not dropped silently: stderr says how many and which, and
``--per-class`` adds ``per_class`` (``per_class_metrics``: every class, those without positives
marked) to the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from fastmlgan.errors import DataError, FastMLGANError
from fastmlgan.metrics import compute_metrics, per_class_metrics
from fastmlgan.safeio import nul_argument, open_regular, read_text, stdout_failed


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.lexists(path):
        raise DataError(f"{what} file not found: {path}")
    try:
        with open_regular(path, f"{what} file") as f:  # a FIFO or a device: refused, not waited on
            array = np.load(f, allow_pickle=False)
            if not isinstance(array, np.ndarray):  # an .npz archive loads as a mapping of arrays
                array.close()
                raise DataError(f"{what} file {path} is an .npz archive; expected a single .npy array")
    except (OSError, ValueError, EOFError) as exc:  # corrupt header, pickled object array
        raise DataError(f"cannot read {what} file {path} as a .npy array: {exc}") from None
    return array


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    """Overflow-free sigmoid in float64; logits beyond about ±36 saturate to 0/1 and tie in mAP."""
    logits = logits.astype(np.float64)
    exp_neg_abs = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + exp_neg_abs), exp_neg_abs / (1.0 + exp_neg_abs))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the metrics of saved scores and targets as one JSON object."""
    parser = _Parser(
        prog="fastmlgan metrics",
        description="Multi-label metrics (C-/O-P/R/F1, mAP, top-3, labels per image) as JSON.",
    )
    parser.add_argument("scores", help="(N, C) .npy of sigmoid outputs in [0, 1] (or logits with --logits)")
    parser.add_argument("targets", help="(N, C) .npy of 0/1 labels")
    parser.add_argument("--threshold", type=float, default=0.5, help="predict a label when score > threshold")
    parser.add_argument("--logits", action="store_true", help="scores are logits: apply a sigmoid first")
    parser.add_argument("--per-class", action="store_true", help="add per_class: P, R, F1, AP of every class")
    parser.add_argument("--class-names", help="text file, one class name a line, in column order (with --per-class)")
    if nul_argument(argv or []):
        print(nul_argument(argv), file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except FastMLGANError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if not math.isfinite(args.threshold):
            raise DataError(f"--threshold must be a finite number, got {args.threshold}")
        scores = _load_npy(args.scores, "scores")
        targets = _load_npy(args.targets, "targets")
        if args.logits:
            if scores.dtype.kind not in "biuf":
                raise DataError(f"scores must be a numeric array, got dtype {scores.dtype}")
            if not np.isfinite(scores).all():
                raise DataError(f"logits in {args.scores} contain NaN or infinite values")
            scores = _sigmoid(scores)
        metrics = compute_metrics(scores, targets, threshold=args.threshold)
        if args.per_class:
            names = _read_class_names(args.class_names) if args.class_names else None
            metrics["per_class"] = per_class_metrics(scores, targets, names, threshold=args.threshold)
    except FastMLGANError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    without = np.flatnonzero(~np.asarray(targets).astype(bool).any(axis=0))
    if len(without):
        listed = ", ".join(str(c) for c in without[:20]) + (", ..." if len(without) > 20 else "")
        print(
            f"note: {len(without)} of {metrics['num_classes']} classes have no positive target (column {listed}): "
            "recall and AP are undefined for them, so C-P, C-R, C-F1 and mAP average over the other "
            f"{metrics['num_classes_evaluated']} (O-P, O-R, O-F1 count them); --per-class lists every class",
            file=sys.stderr,
        )
    try:
        print(json.dumps(metrics), flush=True)
    except OSError as exc:  # standard output on a full disk (or /dev/full)
        print(stdout_failed(exc), file=sys.stderr)
        return 2
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise DataError(f"{message} (see {self.prog} --help)")


def _read_class_names(path: str) -> list[str]:
    return [line.strip() for line in read_text(path, "--class-names").splitlines() if line.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
