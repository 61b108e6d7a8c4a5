"""The figures of ``fastmlgan.reproduce``'s results.md (matplotlib, Agg backend: no display needed).

- ``f1.png``: per-variant test C-F1 and O-F1, mean with ± std error bars and one dot per seed;
- ``labels_per_image.png``: labels predicted per image per variant against the true count (the
  paper's 2.09 → 2.61, §4.2.1);
- ``cooccurrence.png``: the true label co-occurrence matrix of the test split beside the ones
  predicted by the baseline and by + WGAN-gp (one seed's ``Trainer.predict`` scores).

Small figures at 100 dpi keep each PNG well under 200 KB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100


def pyplot():
    """matplotlib's pyplot on the Agg backend; ``ImportError`` without matplotlib (the plots extra,
    imported here only: the harness runs without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variant_rows(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return list(results["variants"].items())


def plot_f1(results: Mapping[str, Any], path: Path) -> str:
    plt = pyplot()
    rows = _variant_rows(results)
    labels = [entry["label"] for _, entry in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=DPI)
    for offset, key, color in ((-0.18, "C-F1", "tab:blue"), (0.18, "O-F1", "tab:orange")):
        means = [entry["test"]["mean"][key] for _, entry in rows]
        stds = [entry["test"]["std"][key] for _, entry in rows]
        ax.bar(x + offset, means, width=0.34, yerr=stds, capsize=3, color=color, alpha=0.75, label=key)
        for i, (_, entry) in enumerate(rows):
            seeds = entry["test"]["per_seed"][key]
            ax.plot(np.full(len(seeds), x[i] + offset), seeds, "k.", markersize=3)
    lows = [min(entry["test"]["per_seed"][k]) for _, entry in rows for k in ("C-F1", "O-F1")]
    highs = [max(entry["test"]["per_seed"][k]) for _, entry in rows for k in ("C-F1", "O-F1")]
    pad = max(1.0, 0.15 * (max(highs) - min(lows)))
    ax.set_ylim(min(lows) - 3 * pad, max(highs) + pad)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test F1 (%)")
    ax.set_title(f"{results['dataset']}: mean ± std over {len(results['seeds'])} seeds (dots: seeds)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def plot_labels_per_image(results: Mapping[str, Any], path: Path) -> str:
    plt = pyplot()
    rows = _variant_rows(results)
    labels = [entry["label"] for _, entry in rows]
    x = np.arange(len(rows))
    means = [entry["test"]["mean"]["avg_labels"] for _, entry in rows]
    stds = [entry["test"]["std"]["avg_labels"] for _, entry in rows]
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=DPI)
    ax.bar(x, means, yerr=stds, capsize=3, color="tab:green", alpha=0.75)
    truth = rows[0][1].get("test_true_labels_per_image") if rows else None
    if truth is not None:
        ax.axhline(truth, color="k", linestyle="--", linewidth=1, label=f"true: {truth:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("labels predicted per image")
    ax.set_title(f"{results['dataset']}: mean ± std over {len(results['seeds'])} seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def cooccurrence(labels: np.ndarray) -> np.ndarray:
    """(C, C) fraction of images holding each pair of labels; the diagonal is each label's
    frequency (the metrics' ``cooc_dist`` zeroes it)."""
    binary = np.asarray(labels, dtype=np.float64)
    return binary.T @ binary / max(len(binary), 1)


def plot_cooccurrence(
    targets: np.ndarray,
    scores: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    path: Path,
    threshold: float = 0.5,
    title: str = "",
) -> str:
    """True co-occurrence and, per entry of ``scores``, that of the predicted label sets
    (score > threshold), on one colour scale; the panel titles give ||P_pred − P_true||_F off the
    diagonal."""
    plt = pyplot()
    true = cooccurrence(targets)
    panels = [("true labels", true)]
    for name, s in scores.items():
        panels.append((name, cooccurrence(np.asarray(s) > threshold)))
    vmax = max(p.max() for _, p in panels)
    num_classes = len(class_names)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.9 * len(panels) + 1.6, 4.2), dpi=DPI, layout="constrained", squeeze=False
    )
    axes = axes[0]
    off = ~np.eye(num_classes, dtype=bool)
    image = None
    for i, (ax, (name, matrix)) in enumerate(zip(axes, panels)):
        image = ax.imshow(matrix, vmin=0.0, vmax=vmax, cmap="viridis")
        if name != "true labels":
            dist = np.linalg.norm((matrix - true)[off])
            name = f"{name}\n||P − P_true|| = {dist:.3f}"
        ax.set_title(name, fontsize=8)
        if num_classes <= 20:
            ticks = np.arange(num_classes)
            short = [c[:10] for c in class_names]
            ax.set_xticks(ticks, short, rotation=90, fontsize=6)
            ax.set_yticks(ticks, short if i == 0 else [], fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="P(both labels)")
    if title:
        fig.suptitle(title, fontsize=9, y=1.0)
    fig.savefig(path)
    plt.close(fig)
    return path.name


def write_plots(results: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """The per-variant figures of ``results`` into ``out_dir``; returns {figure: file name}."""
    if not results.get("variants"):
        return {}
    return {
        "f1": plot_f1(results, out_dir / "f1.png"),
        "labels_per_image": plot_labels_per_image(results, out_dir / "labels_per_image.png"),
    }
