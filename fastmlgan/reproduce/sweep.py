"""One row of the harness against its references across several results folders: a sweep of one
knob (the labelsets evidence, α) or a list of data sets. Reads the ``results.json`` files the
harness wrote; runs nothing.

    fastmlgan sweep NAME OUT_DIR X=RESULTS_DIR[:ROW] [X=RESULTS_DIR[:ROW] ...]

Each point ``X=DIR[:ROW]`` takes row ROW (default ``wgan``) of ``DIR/results.json``; X is the
point's label (a number for a knob, which also gives a plot, or a data set name). Writes
``OUT_DIR/sweep-NAME.md``, ``sweep-NAME.json`` and, for numeric X with matplotlib,
``sweep-NAME.png``. Every number is a paired difference (same seed = same split and phase 1) as
the harness computes it: mean ± SE over seeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastmlgan.errors import ConfigError

# (column, where in the row's entry, reference)
COLUMNS = (
    ("ΔC-F1 vs (a)", ("diff_vs_baseline", "C-F1")),
    ("ΔO-F1 vs (a)", ("diff_vs_baseline", "O-F1")),
    ("ΔC-R vs (a)", ("diff_vs_baseline", "C-R")),
    ("ΔC-P vs (a)", ("diff_vs_baseline", "C-P")),
    ("Δlabels/img vs (a)", ("diff_vs_baseline", "avg_labels")),
    ("ΔmAP vs (a)", ("diff_vs_baseline", "mAP")),
    ("ΔC-F1 vs no-D control", ("diff_vs_bce_continued", "C-F1")),
    ("ΔO-F1 vs no-D control", ("diff_vs_bce_continued", "O-F1")),
    ("ΔC-F1 vs (a) tuned global", ("threshold_check", "C-F1: at_0.5 vs baseline tuned_global")),
    ("ΔC-F1 vs (a) tuned per class", ("threshold_check", "C-F1: at_0.5 vs baseline tuned_per_class")),
    ("ΔC-F1 both tuned global", ("threshold_check", "C-F1: tuned_global vs baseline tuned_global")),
    ("Δcooc_dist vs (a)", ("threshold_check", "at_0.5/cooc_dist vs baseline")),
    ("Δpair recall vs (a)", ("threshold_check", "at_0.5/pair_recall vs baseline")),
    ("Δhidden C-F1 vs (a)", ("threshold_check", "subsets/hidden/C-F1 vs baseline")),
    ("Δhidden C-R vs (a)", ("threshold_check", "subsets/hidden/C-R vs baseline")),
)
PLOTTED = ("ΔC-F1 vs (a)", "ΔC-F1 vs no-D control", "ΔC-F1 vs (a) tuned global", "Δhidden C-F1 vs (a)")


def parse_point(text: str) -> tuple[str, Path, str]:
    x, eq, rest = text.partition("=")
    if not eq or not x or not rest:
        raise ConfigError(f"sweep point {text!r}: expected X=RESULTS_DIR or X=RESULTS_DIR:ROW")
    # RESULTS_DIR may itself hold a ':' (the row, a variant name, never holds '/').
    folder, sep, row = rest.rpartition(":")
    if not sep or "/" in row or Path(rest).is_dir():
        folder, row = rest, ""
    return x, Path(folder), row or "wgan"


def collect(points: Sequence[tuple[str, Path, str]]) -> list[dict[str, Any]]:
    """One entry per point: its row's paired differences (None where the folder lacks them),
    labels per image against the truth, and the phase-2 time against the control's."""
    out = []
    for x, folder, row in points:
        path = folder / "results.json"
        try:
            results = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (run the harness with --out {folder} first)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable results.json ({e})") from None
        variants = results.get("variants", {})
        if row not in variants:
            raise ConfigError(f"{path}: no row {row!r} (rows: {', '.join(variants)})")
        entry = variants[row]
        cells = {}
        for column, (section, key) in COLUMNS:
            cells[column] = (entry.get(section) or {}).get(key)
        point: dict[str, Any] = {
            "x": x,
            "folder": str(folder),
            "row": row,
            "label": entry["label"],
            "dataset": results.get("dataset"),
            "n": len(entry.get("seeds", [])),
            "cells": cells,
            "true_labels": variants.get("baseline", {}).get("test_true_labels_per_image"),
            "labels": {name: variants[name]["test"]["mean"].get("avg_labels") for name in ("baseline", row, "bce_continued") if name in variants},
        }
        fit = {name: (variants[name].get("mechanism") or {}).get("mean", {}).get("fit_s") for name in (row, "bce_continued")}
        if all(fit.values()):
            point["fit_s"] = fit
            point["fit_ratio_to_control"] = fit[row] / fit["bce_continued"]
        out.append(point)
    return out


def _cell(diff: dict[str, Any] | None) -> str:
    if not diff or diff.get("mean") is None:
        return "-"
    if diff.get("se") is None:
        return f"{diff['mean']:+.2f}"
    mark = " **>2SE**" if diff.get("exceeds_2se") else ""
    return f"{diff['mean']:+.2f} ± {diff['se']:.2f}{mark}"


def render(name: str, points: list[dict[str, Any]]) -> str:
    columns = [c for c, _ in COLUMNS if any(p["cells"][c] for p in points)]
    lines = [
        f"# Sweep: {name}",
        "",
        "Paired differences (same seed = same split and phase 1), mean ± SE over seeds; **>2SE** where "
        "|mean| > 2 SE. (a) = the baseline at threshold 0.5 unless 'tuned' (threshold chosen on the "
        "validation split). Read from the harness's results.json files; commands in each folder's results.md.",
        "",
        "| point | row | n | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for p in points:
        cells = [_cell(p["cells"][c]) for c in columns]
        lines.append(f"| {p['x']} | {p['label']} | {p['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| point | labels/img: truth | baseline | row | control | phase-2 fit s: row / control | ratio | folder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        labels = p["labels"]

        def f(v, d=2):
            return "-" if v is None else f"{v:.{d}f}"

        fit = p.get("fit_s") or {}
        lines.append(
            f"| {p['x']} | {f(p['true_labels'])} | {f(labels.get('baseline'))} | {f(labels.get(p['row']))} | "
            f"{f(labels.get('bce_continued'))} | {f(fit.get(p['row']), 0)} / {f(fit.get('bce_continued'), 0)} | "
            f"{f(p.get('fit_ratio_to_control'), 1)} | `{p['folder']}` |"
        )
    return "\n".join(lines) + "\n"


def plot(name: str, points: list[dict[str, Any]], path: Path) -> str | None:
    try:
        xs = [float(p["x"]) for p in points]
    except ValueError:
        return None  # categorical points (data sets): the table says it
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=100)
    step = 0.012 * ((max(xs) - min(xs)) or 1.0)  # side by side, so that the error bars do not overlap
    for i, column in enumerate(PLOTTED):
        cells = [p["cells"].get(column) for p in points]
        if not any(cells):
            continue
        shift = (i - (len(PLOTTED) - 1) / 2) * step
        pts = [(x + shift, c["mean"], c.get("se") or 0.0) for x, c in zip(xs, cells) if c]
        ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[2 * q[2] for q in pts], marker="o", capsize=3,
                    label=column)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(name)
    ax.set_ylabel("paired difference (F1 points)")
    ax.set_title(f"{name} sweep: paired differences, mean ± 2 SE over seeds (rows: sweep-{name}.md)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
