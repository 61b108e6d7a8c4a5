"""The paper's mechanism, measured per row: does the GAN move labels per image towards the truth
and trade precision for recall (§4.2, Table 1: 2.09 → 2.61 labels per image), and is a C-F1 change
just a changed threshold?

For every row the runner keeps G's scores on the validation split (the selection split) and on the
test split, both from the selected G, and ``mechanism_record`` derives:

- ``at_0.5``: ``fastmlgan.metrics.mechanism_metrics`` of the test scores at the paper's 0.5;
- ``tuned_global`` / ``tuned_per_class``: the threshold(s) that ``tune_thresholds`` picks on the
  VALIDATION scores (one for all classes maximising C-F1, or one per class maximising its F1),
  and the test metrics at them (``metrics_at_thresholds``; mAP does not depend on thresholds);
- ``subsets`` (labelsets only): C-P/C-R/C-F1/O-F1/mAP and labels per image over the hidden labels
  (no evidence of their own: only co-occurrence can recover them) and over the visible ones.

The question "is the GAN's C-F1 change explained by a changed threshold?" is then the paired
difference of + WGAN-gp at 0.5 against the baseline at its validation-tuned threshold, and of the
two rows both tuned. ``fit_s`` (the time of ``Trainer.fit``, evaluation included) gives the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastmlgan.metrics import compute_metrics, mechanism_metrics, metrics_at_thresholds, tune_thresholds

TUNED_KEYS = ("C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1", "avg_labels")
SUBSET_KEYS = ("C-P", "C-R", "C-F1", "O-R", "O-F1", "mAP", "avg_labels")
MECHANISM_KEYS = ("avg_labels", "labels_gap", "cooc_dist", "cooc_dist_pairs", "pair_recall", "pair_precision")
THRESHOLD_MODES = ("tuned_global", "tuned_per_class")


def mechanism_record(
    val_scores: np.ndarray,
    val_targets: np.ndarray,
    test_scores: np.ndarray,
    test_targets: np.ndarray,
    hidden: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The per-row mechanism measurements described in the module docstring (JSON-ready)."""
    out: dict[str, Any] = {"at_0.5": mechanism_metrics(test_scores, test_targets)}
    for mode, per_class in (("tuned_global", False), ("tuned_per_class", True)):
        thresholds = tune_thresholds(val_scores, val_targets, per_class=per_class)
        test = metrics_at_thresholds(test_scores, test_targets, thresholds)
        entry = {k: test[k] for k in TUNED_KEYS}
        entry.update({k: v for k, v in mechanism_metrics(test_scores, test_targets, thresholds).items() if k != "avg_labels"})
        entry["threshold_mean"] = float(np.mean(thresholds))
        if not per_class:
            entry["threshold"] = float(thresholds[0])
        out[mode] = entry
    if hidden:
        hidden = sorted(hidden)
        visible = [c for c in range(test_scores.shape[1]) if c not in set(hidden)]
        out["subsets"] = {
            name: _subset(test_scores, test_targets, columns) for name, columns in (("hidden", hidden), ("visible", visible))
        }
    return out


def _subset(scores: np.ndarray, targets: np.ndarray, columns: Sequence[int]) -> dict[str, float]:
    m = compute_metrics(scores[:, columns], targets[:, columns])
    out = {k: m[k] for k in SUBSET_KEYS}
    out["true_labels"] = float(np.asarray(targets)[:, columns].sum(axis=1).mean())
    return out


# ----------------------------------------------------------------------------------------------
# results.json


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """``record["mechanism"]`` as flat keys: ``at_0.5/pair_recall``, ``tuned_global/C-F1``,
    ``subsets/hidden/C-R``, plus ``fit_s``; None values (undefined) are left out."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}/{key}" if prefix else key, sub)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("", record.get("mechanism") or {})
    if "fit_s" in record:
        flat["fit_s"] = float(record["fit_s"])
    return flat


def summarize_mechanism(variants: dict[str, Any], records: dict[tuple[int, str], dict[str, Any]], paired) -> None:
    """Add ``mechanism`` (mean/std/per-seed of the flat keys) to each variant entry that has it, and
    ``threshold_check``: per row, paired differences of its C-F1/O-F1 at 0.5 and tuned against the
    baseline tuned the same way. ``paired`` is ``tables.paired_difference``."""
    for name, entry in variants.items():
        rows = [records[(s, name)] for s in entry["seeds"]]
        flat = [flatten(r) for r in rows]
        if not all(f for f in flat):
            continue
        keys = [k for k in flat[0] if all(k in f for f in flat)]
        per_seed = {k: [f[k] for f in flat] for k in keys}
        entry["mechanism"] = {
            "mean": {k: float(np.mean(v)) for k, v in per_seed.items()},
            "std": {k: float(np.std(v)) for k, v in per_seed.items()},
            "per_seed": per_seed,
        }
    base = variants.get("baseline", {}).get("mechanism")
    if not base:
        return
    for name, entry in variants.items():
        if name == "baseline" or "mechanism" not in entry:
            continue
        common = [s for s in entry["seeds"] if s in variants["baseline"]["seeds"]]
        mine = {s: flatten(records[(s, name)]) | _plain(records[(s, name)]) for s in common}
        theirs = {s: flatten(records[(s, "baseline")]) | _plain(records[(s, "baseline")]) for s in common}
        check: dict[str, Any] = {}
        for key in ("C-F1", "O-F1", "C-R", "C-P"):
            for row_mode, base_mode in (
                ("at_0.5", "at_0.5"),
                ("at_0.5", "tuned_global"),
                ("at_0.5", "tuned_per_class"),
                ("tuned_global", "tuned_global"),
                ("tuned_per_class", "tuned_per_class"),
            ):
                a = [mine[s][f"{row_mode}/{key}"] for s in common]
                b = [theirs[s][f"{base_mode}/{key}"] for s in common]
                check[f"{key}: {row_mode} vs baseline {base_mode}"] = paired(a, b)
        for key in ("at_0.5/labels_gap", "at_0.5/cooc_dist", "at_0.5/cooc_dist_pairs", "at_0.5/pair_recall"):
            if all(key in mine[s] and key in theirs[s] for s in common):
                check[f"{key} vs baseline"] = paired([mine[s][key] for s in common], [theirs[s][key] for s in common])
        for subset in ("hidden", "visible"):
            for key in ("C-F1", "C-R", "avg_labels"):
                k = f"subsets/{subset}/{key}"
                if all(k in mine[s] and k in theirs[s] for s in common):
                    check[f"{k} vs baseline"] = paired([mine[s][k] for s in common], [theirs[s][k] for s in common])
        entry["threshold_check"] = check


def _plain(record: dict[str, Any]) -> dict[str, float]:
    """The row's test metrics at 0.5 under the ``at_0.5/`` prefix (P/R/F1 live in ``test``)."""
    return {f"at_0.5/{k}": float(v) for k, v in record["test"].items() if isinstance(v, (int, float))}


# ----------------------------------------------------------------------------------------------
# results.md


def render_mechanism(results: dict[str, Any], pm, diff_cell) -> list[str]:
    """The mechanism section of results.md; ``pm`` and ``diff_cell`` are the tables' cell writers."""
    rows = [(n, e) for n, e in results["variants"].items() if e.get("mechanism")]
    if not rows:
        return []

    def cell(entry, key, decimals):
        m, s = entry["mechanism"]["mean"].get(key), entry["mechanism"]["std"].get(key)
        return "-" if m is None else f"{m:.{decimals}f} ± {s:.{decimals}f}"

    true = results["variants"].get("baseline", {}).get("test_true_labels_per_image")
    lines = [
        "",
        "## The mechanism: labels per image, recall, label pairs",
        "",
        "At the paper's threshold 0.5 on the test split. labels gap = predicted − true labels per image"
        + (f" (true: {true:.2f})" if true is not None else "")
        + "; cooc_dist: ‖P̂ − P‖_F of the pair frequencies, cooc_dist_pairs: the same with each matrix scaled to "
        "unit mass (the pattern, whatever the number of labels); pair recall/precision: label pairs that co-occur "
        "in an image, true ones found / predicted ones true. fit: seconds of `Trainer.fit` (evaluation included).",
        "",
        "| Methods | C-P | C-R | labels/img | labels gap | cooc_dist | cooc_dist_pairs | pair recall | pair precision | fit (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, entry in rows:
        lines.append(
            f"| {entry['label']} | {pm(entry, 'C-P', 1)} | {pm(entry, 'C-R', 1)} | {cell(entry, 'at_0.5/avg_labels', 2)} | "
            f"{cell(entry, 'at_0.5/labels_gap', 2)} | {cell(entry, 'at_0.5/cooc_dist', 3)} | "
            f"{cell(entry, 'at_0.5/cooc_dist_pairs', 3)} | {cell(entry, 'at_0.5/pair_recall', 1)} | "
            f"{cell(entry, 'at_0.5/pair_precision', 1)} | {cell(entry, 'fit_s', 0)} |"
        )
    lines += [
        "",
        "### Is the change a changed threshold?",
        "",
        "Thresholds tuned on the validation split (the selection split; the test split is not used): one "
        "global threshold maximising C-F1, or one per class maximising that class's F1 (grid 0.01..0.99).",
        "",
        "| Methods | C-F1 at 0.5 | C-F1 tuned global (t) | C-F1 tuned per class | O-F1 at 0.5 | O-F1 tuned global | O-F1 tuned per class | labels/img tuned global |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, entry in rows:
        lines.append(
            f"| {entry['label']} | {pm(entry, 'C-F1', 1)} | {cell(entry, 'tuned_global/C-F1', 1)} "
            f"({cell(entry, 'tuned_global/threshold', 2)}) | {cell(entry, 'tuned_per_class/C-F1', 1)} | "
            f"{pm(entry, 'O-F1', 1)} | {cell(entry, 'tuned_global/O-F1', 1)} | {cell(entry, 'tuned_per_class/O-F1', 1)} | "
            f"{cell(entry, 'tuned_global/avg_labels', 2)} |"
        )
    checked = [(n, e) for n, e in rows if e.get("threshold_check")]
    if checked:
        lines += [
            "",
            "Paired by seed, mean ± SE (**>2SE** as above): the row against the baseline, each at the threshold named.",
            "",
            "| Methods | ΔC-F1 both 0.5 | ΔC-F1 row 0.5 vs base tuned global | ΔC-F1 row 0.5 vs base tuned per class "
            "| ΔC-F1 both tuned global | ΔC-F1 both tuned per class | ΔC-R both 0.5 | Δlabels gap | Δpair recall |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, entry in checked:
            c = entry["threshold_check"]
            cells = [
                c.get("C-F1: at_0.5 vs baseline at_0.5"),
                c.get("C-F1: at_0.5 vs baseline tuned_global"),
                c.get("C-F1: at_0.5 vs baseline tuned_per_class"),
                c.get("C-F1: tuned_global vs baseline tuned_global"),
                c.get("C-F1: tuned_per_class vs baseline tuned_per_class"),
                c.get("C-R: at_0.5 vs baseline at_0.5"),
                c.get("at_0.5/labels_gap vs baseline"),
                c.get("at_0.5/pair_recall vs baseline"),
            ]
            lines.append(f"| {entry['label']} | " + " | ".join(diff_cell(x) for x in cells) + " |")
    subset_rows = [(n, e) for n, e in rows if "subsets/hidden/C-F1" in e["mechanism"]["mean"]]
    if subset_rows:
        lines += [
            "",
            "### Hidden and visible labels (labelsets)",
            "",
            "Hidden labels have no evidence of their own: only their co-occurrence with the visible labels can "
            "recover them. At 0.5 on the test split.",
            "",
            "| Methods | hidden C-P | hidden C-R | hidden C-F1 | hidden labels/img | visible C-F1 | visible C-R | Δhidden C-F1 vs (a) | Δhidden C-R vs (a) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, entry in subset_rows:
            c = entry.get("threshold_check") or {}
            lines.append(
                f"| {entry['label']} | {cell(entry, 'subsets/hidden/C-P', 1)} | {cell(entry, 'subsets/hidden/C-R', 1)} | "
                f"{cell(entry, 'subsets/hidden/C-F1', 1)} | {cell(entry, 'subsets/hidden/avg_labels', 2)} | "
                f"{cell(entry, 'subsets/visible/C-F1', 1)} | {cell(entry, 'subsets/visible/C-R', 1)} | "
                f"{diff_cell(c.get('subsets/hidden/C-F1 vs baseline'))} | {diff_cell(c.get('subsets/hidden/C-R vs baseline'))} |"
            )
        true_hidden = rows[0][1]["mechanism"]["mean"].get("subsets/hidden/true_labels")
        if true_hidden is not None:
            lines.append(f"| (true hidden labels/img: {true_hidden:.2f}) |" + " |" * 8)
    return lines
