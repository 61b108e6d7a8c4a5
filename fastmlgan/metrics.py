"""Multi-label evaluation in the paper's terms (§4, Tables 1-3), in plain numpy.

``compute_metrics(scores, targets)`` takes sigmoid outputs and 0/1 targets, both (N, C), and
returns precision, recall and F1 in percent, as the paper prints them:

- **C-P, C-R, C-F1** (per class): P and R are computed for each class and averaged over classes;
  C-F1 is the harmonic mean of the averaged C-P and C-R, not the mean of per-class F1s.
- **O-P, O-R, O-F1** (overall): true/false positives and false negatives pooled over all labels
  of all images (every class, including those without positives), then P, R and their harmonic
  mean.
- **mAP**: mean over classes of non-interpolated average precision,
  AP = Σ_n (R_n − R_{n−1}) P_n over the distinct scores in decreasing order, so tied scores form
  one threshold (identical to sklearn's ``average_precision_score``).
- **avg_labels**: labels predicted per image (raw count; the paper: 2.09 baseline, 2.61 with the
  GAN, §4.2).
- **cooc_dist**: how far predicted label dependency is from the truth: ||P_pred − P_true||_F with
  P = BᵀB / N, B the binary (N, C) predicted or true label matrix and the diagonal set to 0, i.e.
  the fraction of images in which each pair of labels co-occurs. Each unordered pair counts twice
  (the matrix is symmetric); raw value, 0 when predictions reproduce the true co-occurrences.
- **top3**: the six P/R/F1 keys when every image predicts exactly its k = min(3, C)
  highest-scoring labels whatever their scores (the CNN-RNN convention quoted in Tables 1-2); the
  threshold is *not* also required. Ties go to the lower class index.
- **num_images**, **num_classes**, **num_classes_evaluated**.

The paper's mechanism (§4.2, Table 1: more labels per image, recall up, precision down) has its own
functions: ``mechanism_metrics`` (labels per image against the truth, co-occurrence distances,
recovered label pairs) and the threshold check, ``tune_thresholds`` on a validation split and
``metrics_at_thresholds`` on the test split (is a C-F1 gain just a shifted threshold?), and
``choose_thresholds``, the pair of them a trained model carries to ``predict`` and ``evaluate``.

Conventions, part of the contract:

- A label is predicted when its score is strictly greater than the threshold (0.5, §3.1).
- C- metrics and mAP average over the classes with at least one positive target; recall and AP
  are undefined for the others, which are left out (``num_classes_evaluated`` counts the rest).
  If no class has a positive target, ``DataError`` is raised.
- A class with no predicted labels has precision 0; O-P is 0 when nothing is predicted; F1 is 0
  when P + R = 0.

The command line is ``fastmlgan metrics SCORES.npy TARGETS.npy`` (``commands/metrics.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fastmlgan.errors import ConfigError, DataError

PRF_KEYS = ("C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1")
TOP_K = 3


def compute_metrics(scores, targets, threshold: float = 0.5) -> dict:
    """All of the paper's metrics for (N, C) sigmoid outputs ``scores`` and 0/1 ``targets``."""
    scores, targets = _validate(scores, targets)
    threshold = _validate_threshold(threshold)
    num_images, num_classes = scores.shape
    evaluated = targets.any(axis=0)
    if not evaluated.any():
        raise DataError("targets: no class has a positive label, so recall and mAP are undefined")

    predicted = scores > threshold  # strictly greater (§3.1)
    metrics = _precision_recall_f1(predicted, targets, evaluated)
    metrics["mAP"] = float(100.0 * _average_precision(scores[:, evaluated], targets[:, evaluated]).mean())
    metrics["avg_labels"] = float(predicted.sum(axis=1).mean())
    metrics["cooc_dist"] = float(np.linalg.norm(_cooccurrence(predicted) - _cooccurrence(targets)))

    metrics["top3"] = _top_k_metrics(scores, targets, evaluated)
    metrics["num_images"] = int(num_images)
    metrics["num_classes"] = int(num_classes)
    metrics["num_classes_evaluated"] = int(evaluated.sum())
    return metrics


def _top_k_metrics(scores: np.ndarray, targets: np.ndarray, evaluated: np.ndarray) -> dict:
    """P/R/F1 when every image predicts exactly its k = min(TOP_K, C) best-scored classes."""
    # Stable sort of the negated scores keeps tied classes in index order: lower index wins.
    k = min(TOP_K, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_predicted = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(top_predicted, top, True, axis=1)
    return _precision_recall_f1(top_predicted, targets, evaluated)


def _validate(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and values; return float64 scores and boolean targets."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    for name, array in (("scores", scores), ("targets", targets)):
        if array.dtype.kind not in "biuf":
            raise DataError(f"{name} must be a numeric array, got dtype {array.dtype}")
        if array.ndim != 2:
            raise DataError(f"{name} must be 2-D (num_images, num_classes), got shape {array.shape}")
    if scores.shape != targets.shape:
        raise DataError(f"scores and targets differ in shape: {scores.shape} vs {targets.shape}")
    if scores.size == 0:
        raise DataError(f"scores and targets are empty (shape {scores.shape})")

    scores = scores.astype(np.float64, copy=False)
    if not np.isfinite(scores).all():
        raise DataError(f"scores contain {int((~np.isfinite(scores)).sum())} NaN or infinite values")
    low, high = scores.min(), scores.max()
    if low < 0.0 or high > 1.0:
        raise DataError(
            f"scores must be probabilities in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "are these logits? apply a sigmoid first (command line: --logits)"
        )
    if not ((targets == 0) | (targets == 1)).all():
        bad = np.unique(targets[(targets != 0) & (targets != 1)])[:5]
        raise DataError(f"targets must be 0/1, found values such as {bad.tolist()}")
    return scores, targets.astype(bool)


def _validate_threshold(threshold) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ConfigError(f"threshold must be in [0, 1], got {threshold!r}")
    return value


def _precision_recall_f1(predicted: np.ndarray, targets: np.ndarray, evaluated: np.ndarray) -> dict:
    """The six C-/O- keys, in percent (plain floats, for JSON), for boolean (N, C) predictions."""
    true_pos = (predicted & targets).sum(axis=0)
    num_predicted = predicted.sum(axis=0)
    num_positive = targets.sum(axis=0)

    # A class that is never predicted has precision 0 (it found none of its positives).
    class_precision = np.zeros(len(true_pos))
    np.divide(true_pos, num_predicted, out=class_precision, where=num_predicted > 0)
    class_recall = true_pos[evaluated] / num_positive[evaluated]
    c_p, c_r = class_precision[evaluated].mean(), class_recall.mean()

    total_predicted = num_predicted.sum()
    o_p = true_pos.sum() / total_predicted if total_predicted > 0 else 0.0
    o_r = true_pos.sum() / num_positive.sum()
    values = (c_p, c_r, _harmonic_mean(c_p, c_r), o_p, o_r, _harmonic_mean(o_p, o_r))
    return {key: float(100.0 * value) for key, value in zip(PRF_KEYS, values)}


def _harmonic_mean(precision: float, recall: float) -> float:
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP, (C,), for classes that all have positives; tied scores share one threshold.

    AP = Σ_n (R_n − R_{n−1}) P_n over distinct thresholds = Σ_i y_i P(run of i) / num_positive,
    where every image in a run of tied scores takes the precision at the end of its run.
    """
    num_images = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    sorted_targets = np.take_along_axis(targets, order, axis=0)
    precision = np.cumsum(sorted_targets, axis=0) / np.arange(1, num_images + 1)[:, None]

    rows = np.arange(num_images)[:, None]
    run_end = np.ones(sorted_scores.shape, dtype=bool)
    run_end[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    # For each row, the index of the first run end at or below it: a reversed running minimum.
    end_index = np.where(run_end, rows, num_images)
    end_index = np.minimum.accumulate(end_index[::-1], axis=0)[::-1]
    run_precision = np.take_along_axis(precision, end_index, axis=0)
    return (sorted_targets * run_precision).sum(axis=0) / sorted_targets.sum(axis=0)


def _cooccurrence(labels: np.ndarray) -> np.ndarray:
    """(C, C) fraction of images holding each pair of labels, diagonal zeroed."""
    binary = labels.astype(np.float64)
    pairs = binary.T @ binary / labels.shape[0]
    np.fill_diagonal(pairs, 0.0)
    return pairs


THRESHOLD_GRID = np.round(np.arange(1, 100) / 100.0, 2)
"""Candidate thresholds of ``tune_thresholds``: 0.01, 0.02, ..., 0.99."""


def mechanism_metrics(scores, targets, thresholds=0.5) -> dict:
    """How predicted label sets differ from the true ones in size and dependency (§4.2's mechanism).

    With B̂ the predicted (score > threshold of its class) and B the true (N, C) label matrices:

    - ``avg_labels``, ``true_labels``: mean |B̂_n| and |B_n|; ``labels_gap`` = their difference.
    - ``cooc_dist``: ||P̂ − P||_F with P = BᵀB / N, diagonal zeroed (as ``compute_metrics``).
    - ``cooc_dist_pairs``: ||Q̂ − Q||_F with Q = P / ΣP, each matrix scaled to unit mass: the
      *pattern* of co-occurrence, whatever the number of labels predicted (Q̂ = 0 when no image
      has two predicted labels). 0 when P̂ is any positive multiple of P.
    - ``pair_recall``, ``pair_precision``: of the label pairs {i, j} that co-occur in an image,
      pooled over images, the share of the true ones also predicted, and of the predicted ones
      also true (percent; recall is undefined (None) when no image has two labels, precision 0
      when no pair is predicted).
    """
    scores, targets = _validate(scores, targets)
    predicted = scores > _thresholds_for(thresholds, scores.shape[1])
    pred_f, true_f = predicted.astype(np.float64), targets.astype(np.float64)
    p_pred, p_true = _cooccurrence(predicted), _cooccurrence(targets)
    q_pred = p_pred / p_pred.sum() if p_pred.sum() > 0 else p_pred
    q_true = p_true / p_true.sum() if p_true.sum() > 0 else p_true
    # An image with k labels has k(k-1)/2 pairs; the pairs both sets hold are those of the shared labels.
    shared = _num_pairs((pred_f * true_f).sum(axis=1))
    num_true, num_pred = _num_pairs(true_f.sum(axis=1)), _num_pairs(pred_f.sum(axis=1))
    avg, true_avg = float(pred_f.sum(axis=1).mean()), float(true_f.sum(axis=1).mean())
    return {
        "avg_labels": avg,
        "true_labels": true_avg,
        "labels_gap": avg - true_avg,
        "cooc_dist": float(np.linalg.norm(p_pred - p_true)),
        "cooc_dist_pairs": float(np.linalg.norm(q_pred - q_true)),
        "pair_recall": float(100.0 * shared / num_true) if num_true else None,
        "pair_precision": float(100.0 * shared / num_pred) if num_pred else 0.0,
    }


def _num_pairs(labels_per_image: np.ndarray) -> float:
    return float((labels_per_image * (labels_per_image - 1) / 2).sum())


def _thresholds_for(thresholds, num_classes: int) -> np.ndarray:
    """One threshold or one per class, as a (C,) array in [0, 1]."""
    values = np.asarray(thresholds, dtype=np.float64)
    if values.ndim == 0:
        return np.full(num_classes, _validate_threshold(float(values)))
    if values.shape != (num_classes,):
        raise ConfigError(f"thresholds: expected one value or {num_classes} (one per class), got shape {values.shape}")
    if not ((values >= 0.0) & (values <= 1.0)).all():  # also rejects NaN
        raise ConfigError(f"thresholds must be in [0, 1], got values in [{values.min()}, {values.max()}]")
    return values


def tune_thresholds(scores, targets, per_class: bool = False, grid=THRESHOLD_GRID) -> np.ndarray:
    """(C,) thresholds chosen on a validation split from ``grid``.

    ``per_class=False``: one threshold for all classes, the one with the highest C-F1 (the
    paper's selection metric). ``per_class=True``: each class its own, the one with the highest F1
    of that class (C-F1 is the harmonic mean of the averaged P and R, not a mean of per-class F1s,
    so this maximises each class's F1, not C-F1 exactly; a class without positives keeps 0.5).
    Ties go to the candidate closest to 0.5, then to the lower one.
    """
    scores, targets = _validate(scores, targets)
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not ((grid > 0.0) & (grid < 1.0)).all():
        raise ConfigError("threshold grid: need a non-empty 1-D list of values in (0, 1)")
    # Candidates in order of preference on ties: closest to 0.5 first, then the lower one. The
    # distance is compared in whole steps of 1e-9: as floats |0.7 - 0.5| < |0.3 - 0.5|
    # (0.19999999999999996 against 0.2), which sent 10 of the 49 mirrored pairs of
    # THRESHOLD_GRID (0.3/0.7, 0.04-0.06, 0.18, 0.29-0.31, 0.41-0.43) to the upper one.
    distance = np.rint(np.abs(grid - 0.5) * 1e9)
    grid = grid[np.lexsort((grid, distance))]
    num_classes = scores.shape[1]
    evaluated = targets.any(axis=0)
    if not evaluated.any():
        raise DataError("targets: no class has a positive label; thresholds cannot be tuned")
    if not per_class:
        c_f1 = [_precision_recall_f1(scores > t, targets, evaluated)["C-F1"] for t in grid]
        return np.full(num_classes, grid[int(np.argmax(c_f1))])  # argmax: the first, preferred, maximum
    # (G, N, C) would be large for big splits: loop over the grid, keep (G, C) counts.
    true_pos = np.empty((len(grid), num_classes))
    num_predicted = np.empty((len(grid), num_classes))
    for g, t in enumerate(grid):
        predicted = scores > t
        true_pos[g] = (predicted & targets).sum(axis=0)
        num_predicted[g] = predicted.sum(axis=0)
    num_positive = targets.sum(axis=0)
    # F1 = 2 TP / (predicted + positives); 0 when both are 0.
    denominator = num_predicted + num_positive[None, :]
    f1 = np.divide(2.0 * true_pos, denominator, out=np.zeros_like(true_pos), where=denominator > 0)
    best = grid[np.argmax(f1, axis=0)]
    return np.where(evaluated, best, 0.5)


def metrics_at_thresholds(scores, targets, thresholds) -> dict:
    """``compute_metrics`` with a threshold per class: each class's scores are mapped by a strictly
    increasing piecewise-linear function that sends its threshold t to 0.5 (s ≤ t: 0.5 s / t,
    s > t: 0.5 + 0.5 (s − t) / (1 − t)), so a label is predicted exactly when s > t and the ranking
    within each class, hence mAP, is unchanged. ``top3`` is that of the raw scores."""
    scores, targets = _validate(scores, targets)
    t = _thresholds_for(thresholds, scores.shape[1])[None, :]
    above = scores > t
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(t > 0, 0.5 * scores / np.where(t > 0, t, 1.0), 0.5)
        high = np.where(t < 1, 0.5 + 0.5 * (scores - t) / np.where(t < 1, 1.0 - t, 1.0), 1.0)
    mapped = np.where(above, high, low)
    # Rounding must not move a score across 0.5: above stays > 0.5, the rest <= 0.5.
    mapped = np.where(above, np.maximum(mapped, np.nextafter(0.5, 1.0)), np.minimum(mapped, 0.5))
    metrics = compute_metrics(np.clip(mapped, 0.0, 1.0), targets)
    # top3 ranks classes against each other: the per-class map would reorder them, so it comes
    # from the raw scores (it does not depend on any threshold).
    metrics["top3"] = _top_k_metrics(scores, targets, targets.any(axis=0))
    return metrics


def choose_thresholds(scores, targets) -> dict:
    """The thresholds a run carries (``fastmlgan train --data.val_fraction``), chosen on validation
    scores and targets only: ``global``, the one threshold of ``tune_thresholds`` (highest C-F1),
    and ``per_class``, each class's own (``tune_thresholds(per_class=True)``), with the validation
    C-F1 at 0.5 and at each (``validation_C-F1``)."""
    global_t = float(tune_thresholds(scores, targets)[0])
    per_class = tune_thresholds(scores, targets, per_class=True)
    return {
        "global": global_t,
        "per_class": [float(t) for t in per_class],
        "validation_C-F1": {
            "0.5": compute_metrics(scores, targets)["C-F1"],
            "global": compute_metrics(scores, targets, global_t)["C-F1"],
            "per_class": metrics_at_thresholds(scores, targets, per_class)["C-F1"],
        },
    }


def format_table(rows: Mapping[str, Mapping], title: str | None = None) -> str:
    """A fixed-width text table in the layout of the paper's Tables 1-2, one row per entry.

    P/R/F1 and mAP print to one decimal, labels/img to two; a missing value prints as ``-`` (so
    rows quoted from other papers, which give only the six P/R/F1 values, fit too).
    """
    # (metrics key, heading, width, decimals)
    columns = [(key, key, 6, 1) for key in PRF_KEYS]
    columns += [("mAP", "mAP", 6, 1), ("avg_labels", "labels/img", 12, 2)]
    name_width = max([len("Methods"), *map(len, rows)])

    def line(name: str, cells: Sequence[str]) -> str:
        widths = [width for _, _, width, _ in columns]
        return name.ljust(name_width) + "".join(text.rjust(width) for text, width in zip(cells, widths))

    def cell(value, decimals: int) -> str:
        return "-" if value is None else f"{value:.{decimals}f}"

    header = line("Methods", [heading for _, heading, _, _ in columns])
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for name, metrics in rows.items():
        lines.append(line(name, [cell(metrics.get(key), decimals) for key, _, _, decimals in columns]))
    return "\n".join(lines)


def per_class_metrics(scores, targets, class_names: Sequence[str] | None = None, threshold: float = 0.5) -> list[dict]:
    """P, R, F1 and AP of every class, in percent, in class order, with its number of positive
    targets and of predicted labels. A class with no positive target is listed, not dropped: its
    recall, F1 and AP are undefined (None) and ``note`` says why; its precision is 0 (every label
    predicted for it is wrong, and a class never predicted has precision 0). Over the other
    classes, the means of P, R and AP are C-P, C-R and mAP of ``compute_metrics``."""
    scores, targets = _validate(scores, targets)
    threshold = _validate_threshold(threshold)
    num_classes = scores.shape[1]
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise DataError(f"{len(names)} class names for {num_classes} classes")
    predicted = scores > threshold
    true_pos = (predicted & targets).sum(axis=0)
    num_predicted = predicted.sum(axis=0)
    num_positive = targets.sum(axis=0)
    evaluated = num_positive > 0
    ap = np.full(num_classes, np.nan)
    if evaluated.any():
        ap[evaluated] = _average_precision(scores[:, evaluated], targets[:, evaluated])
    rows = []
    for c in range(num_classes):
        precision = true_pos[c] / num_predicted[c] if num_predicted[c] else 0.0
        row = {
            "class": names[c],
            "index": c,
            "positives": int(num_positive[c]),
            "predicted": int(num_predicted[c]),
            "P": float(100.0 * precision),
            "R": None,
            "F1": None,
            "AP": None,
        }
        if evaluated[c]:
            recall = true_pos[c] / num_positive[c]
            row.update(R=float(100.0 * recall), F1=float(100.0 * _harmonic_mean(precision, recall)), AP=float(100.0 * ap[c]))
        else:
            row["note"] = "no positive target: recall, F1 and AP undefined; left out of C-P/C-R/C-F1 and mAP"
        rows.append(row)
    return rows


def format_per_class(rows: Sequence[Mapping], title: str | None = None) -> str:
    """``per_class_metrics`` as a fixed-width table; undefined values print as ``-`` and a last
    line counts the classes without positives."""
    name_width = max([len("class"), *(len(r["class"]) for r in rows)])
    header = "class".ljust(name_width) + "".join(h.rjust(w) for h, w in (("pos", 8), ("pred", 8), ("P", 7), ("R", 7), ("F1", 7), ("AP", 7)))
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for r in rows:
        cells = [f"{r['positives']:>8}", f"{r['predicted']:>8}"]
        cells += [("-" if r[k] is None else f"{r[k]:.1f}").rjust(7) for k in ("P", "R", "F1", "AP")]
        lines.append(r["class"].ljust(name_width) + "".join(cells))
    missing = [r["class"] for r in rows if r["positives"] == 0]
    if missing:
        lines.append(
            f"{len(missing)} of {len(rows)} classes have no positive target ({', '.join(missing[:10])}"
            f"{', ...' if len(missing) > 10 else ''}): left out of C-P, C-R, C-F1 and mAP"
        )
    return "\n".join(lines)
