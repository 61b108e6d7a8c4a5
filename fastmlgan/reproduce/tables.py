"""The tables: ``results.json`` (``summarize``: mean, std and per-seed values of every metric,
paired differences between rows) and ``results.md`` (``render_markdown``: Tables 1 and 3 of the
paper, then the selection, the critic's diagnostics and how the numbers were made)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fastmlgan.config import Config
from fastmlgan.data.sources import SOURCES
from fastmlgan.metrics import PRF_KEYS
from fastmlgan.reproduce.mechanism import render_mechanism, summarize_mechanism
from fastmlgan.reproduce.protocol import SELECTION_RULE, VAL_STREAM, VARIANTS, HarnessOptions

TABLE_KEYS = (*PRF_KEYS, "mAP", "avg_labels")
DIFF_KEYS = ("C-F1", "O-F1", "C-P", "C-R", "O-P", "O-R", "mAP", "avg_labels")
CRITIC_LOG_KEYS = ("wasserstein", "gp", "d_matched", "d_generated", "d_mismatched", "g_adversarial")
CRITIC_SCORE_KEYS = (
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

Records = dict[tuple[int, str], dict[str, Any]]
"""Finished rows by (seed, variant name), as appended to ``results.jsonl``."""


# ----------------------------------------------------------------------------------------------
# Statistics over seeds


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


# ----------------------------------------------------------------------------------------------
# results.json


def selected_records(records: Records, opts: HarnessOptions) -> list[dict[str, Any]]:
    """The finished rows this invocation asked for, seed-major."""
    return [records[(s, v)] for s in opts.seeds for v in opts.variants if (s, v) in records]


def summarize(records: Records, opts: HarnessOptions, cfg: Config) -> dict[str, Any]:
    """results.json: per variant the mean/std/per-seed of every test (and validation) metric,
    the selected epochs, paired differences and D's logs."""
    variants: dict[str, Any] = {}
    for name in opts.variants:
        rows = [(s, records[(s, name)]) for s in opts.seeds if (s, name) in records]
        if rows:
            variants[name] = _variant_entry(name, rows)
    _add_paired_differences(variants, records)
    summarize_mechanism(variants, records, paired_difference)
    return {
        "dataset": _dataset_name(cfg),
        "preset": cfg.preset,
        "seeds": opts.seeds,
        "protocol": _protocol(opts, records),
        "config": cfg.to_dict(),
        "variants": variants,
    }


def _variant_entry(name: str, rows: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One row of the tables over its seeds: statistics of every test and validation metric."""
    variant = VARIANTS[name]
    entry: dict[str, Any] = {
        "label": variant.label,
        "table3": variant.table3,
        "overrides": variant.overrides,
        "config": rows[0][1]["config"],
        "seeds": [s for s, _ in rows],
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
    if variant.overrides is not None and variant.adversarial:
        entry["d_log"] = _mean_nested([r.get("d_log", {}) for _, r in rows])
        entry["d_diagnostics"] = _mean_nested([r.get("d_diagnostics", {}) for _, r in rows])
    return entry


def _add_paired_differences(variants: dict[str, Any], records: Records) -> None:
    """``diff_vs_<ref>`` of each row against its references, on the seeds both rows ran."""
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


def _references(name: str) -> list[str]:
    """The rows a row is compared with: the baseline; + WGAN-gp for the ablations and the control;
    the control for every GAN row."""
    if name == "baseline":
        return []
    refs = ["baseline"]
    variant = VARIANTS[name]
    if variant.overrides is None:  # a phase-1 row of its own (asl, ema): against the BCE baseline
        return refs
    if variant.start_from != "baseline":  # asl_wgan: what D adds to its own phase 1
        refs.append(variant.start_from)
    if name != "wgan":
        refs.append("wgan")
    if variant.adversarial:
        refs.append("bce_continued")
    return refs


def _protocol(opts: HarnessOptions, records: Records) -> dict[str, Any]:
    any_record = next(iter(selected_records(records, opts)), None)
    return {
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
    }


def _dataset_name(cfg: Config) -> str:
    return SOURCES[cfg.data.dataset].title(cfg.data)


# ----------------------------------------------------------------------------------------------
# results.md


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: one section per function below, in this order."""
    sections = (
        _title,
        _table1,
        _table3,
        _against_control,
        _mechanism,
        _differences_to_baseline,
        _top3,
        _selection,
        _critic,
        _plots,
        _protocol_notes,
        _run,
    )
    return "\n".join(line for section in sections for line in section(results))


def _title(results: dict[str, Any]) -> list[str]:
    sizes = results["protocol"].get("split_sizes") or {}
    return [
        f"# {results['dataset']}: Tables 1 and 3 over {len(results['seeds'])} seeds",
        "",
        f"Test split ({sizes.get('test_rows', '?')} rows), mean ± standard deviation over seeds "
        f"{', '.join(map(str, results['seeds']))} (np.std, ddof=0). Written by `fastmlgan.reproduce`.",
    ]


def _table1(results: dict[str, Any]) -> list[str]:
    v = results["variants"]
    lines = [
        "",
        "## Table 1 layout",
        "",
        "| Methods | C-P | C-R | C-F1 | O-P | O-R | O-F1 | mAP | labels/img |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in v.values():
        cells = [_pm(entry, k, 2 if k == "avg_labels" else 1) for k in TABLE_KEYS]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    if "baseline" in v:
        lines.append(
            f"| (true labels/img of the test split: {v['baseline']['test_true_labels_per_image']:.2f}) |" + " |" * 8
        )
    return lines


def _table3(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Table 3 layout",
        "",
        "| | Methods | C-F1 | O-F1 | ΔC-F1 vs (a) | ΔO-F1 vs (a) | ΔC-F1 vs (b) | ΔO-F1 vs (b) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["variants"].values():
        vs_a, vs_b = entry.get("diff_vs_baseline", {}), entry.get("diff_vs_wgan", {})
        lines.append(
            f"| {entry['table3']} | {entry['label']} | {_pm(entry, 'C-F1', 1)} | {_pm(entry, 'O-F1', 1)} | "
            f"{_diff_cell(vs_a.get('C-F1'))} | {_diff_cell(vs_a.get('O-F1'))} | "
            f"{_diff_cell(vs_b.get('C-F1'))} | {_diff_cell(vs_b.get('O-F1'))} |"
        )
    return [
        *lines,
        "",
        f"Δ: paired by seed (each seed's rows share one split and one phase-1 run; n = {len(results['seeds'])}), "
        "mean ± standard error (sample SD / √n); **>2SE** marks a difference larger than two standard errors.",
    ]


def _against_control(results: dict[str, Any]) -> list[str]:
    rows = [e for e in results["variants"].values() if "diff_vs_bce_continued" in e]
    if not rows:
        return []
    lines = [
        "",
        "## GAN rows against the control (the same phase-2 G steps on L_logistic alone, no D)",
        "",
        "| Methods | ΔC-F1 | ΔO-F1 | ΔmAP | Δlabels/img |",
        "|---|---|---|---|---|",
    ]
    for entry in rows:
        diff = entry["diff_vs_bce_continued"]
        cells = [_diff_cell(diff[k]) for k in ("C-F1", "O-F1", "mAP", "avg_labels")]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return lines


def _mechanism(results: dict[str, Any]) -> list[str]:
    return render_mechanism(results, _pm, _diff_cell)


def _differences_to_baseline(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Paired differences to the baseline, all Table 1 keys",
        "",
        "| Methods | " + " | ".join(f"Δ{k}" for k in DIFF_KEYS) + " |",
        "|---|" + "---|" * len(DIFF_KEYS),
    ]
    for entry in results["variants"].values():
        if "diff_vs_baseline" in entry:
            diff = entry["diff_vs_baseline"]
            lines.append(f"| {entry['label']} | " + " | ".join(_diff_cell(diff[k]) for k in DIFF_KEYS) + " |")
    return lines


def _top3(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Top-3 labels per image (the CNN-RNN convention of Tables 1-2)",
        "",
        "| Methods | " + " | ".join(PRF_KEYS) + " |",
        "|---|" + "---|" * len(PRF_KEYS),
    ]
    for entry in results["variants"].values():
        lines.append(f"| {entry['label']} | " + " | ".join(_pm(entry, f"top3/{k}", 1) for k in PRF_KEYS) + " |")
    return lines


def _selection(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Selection (validation split)",
        "",
        "| Methods | val C-F1 | val O-F1 | phase-1 epochs | GAN epochs | test cooc_dist |",
        "|---|---|---|---|---|---|",
    ]
    for entry in results["variants"].values():
        sel = entry["selected_epochs"]
        lines.append(
            f"| {entry['label']} | {_pm(entry, 'C-F1', 1, 'val')} | {_pm(entry, 'O-F1', 1, 'val')} | "
            f"{_list(sel.get('bce'))} | {_list(sel.get('gan'))} | {_pm(entry, 'cooc_dist', 3)} |"
        )
    return lines


def _critic(results: dict[str, Any]) -> list[str]:
    rows = [e for e in results["variants"].values() if e.get("d_log")]
    if not rows:
        return []
    lines = [
        "",
        "## The critic (phase-2 logs, mean over seeds; first → last quarter of the logged steps)",
        "",
        "| Methods | wasserstein | gp | d_matched | d_generated | d_mismatched | g_adversarial |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in rows:
        lines.append(f"| {entry['label']} | " + " | ".join(_trend(entry["d_log"], k) for k in CRITIC_LOG_KEYS) + " |")
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
    for entry in rows:
        d = entry.get("d_diagnostics") or {}
        cells = [f"{d[k]:.3f}" if k in d else "-" for k in CRITIC_SCORE_KEYS]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return lines


def _plots(results: dict[str, Any]) -> list[str]:
    plots = results.get("plots") or {}
    if not plots:
        return []
    lines = ["", "## Plots", ""]
    for key, file in plots.items():
        lines += [f"![{key}]({file})", ""]
    return lines


def _protocol_notes(results: dict[str, Any]) -> list[str]:
    proto, train = results["protocol"], results["config"]["train"]
    sizes = proto.get("split_sizes") or {}
    return [
        "",
        "## Protocol",
        "",
        f"- Split: {proto['split']}. Sizes: "
        + ", ".join(f"{k} {val}" for k, val in sizes.items() if k.endswith("rows"))
        + ".",
        f"- Selection: {proto['selection_rule']}.",
        f"- Differences: {proto['paired_difference']}.",
        f"- Epoch budget: phase 1 up to {train['bce_epochs']}, phase 2 up to {train['gan_epochs']} epochs, "
        f"evaluated every {train['eval_every']}.",
    ]


def _run(results: dict[str, Any]) -> list[str]:
    env, wall = results.get("environment", {}), results.get("wall_s", {})
    return [
        "",
        "## Run",
        "",
        f"- Command: `{results.get('command', '')}`",
        f"- Wall time: {duration_text(wall.get('sum_of_rows', 0))} summed over the rows "
        f"({duration_text(wall.get('this_invocation', 0))} this invocation)",
        f"- Device: {env.get('device', '?')}, {env.get('threads', '?')} torch threads",
        f"- Versions: fastmlgan {env.get('fastmlgan', '?')}, torch {env.get('torch', '?')}, numpy {env.get('numpy', '?')}, "
        f"python {env.get('python', '?')}",
        f"- Git revision: {env.get('git', '?')} (this invocation); revision of the rows: "
        f"{', '.join(results.get('row_revisions', [])) or '?'}",
        "",
        "The full config (resolved options) of every row is in `results.json`.",
        "",
    ]


# ----------------------------------------------------------------------------------------------
# Cells


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


def _trend(log: dict[str, Any], key: str) -> str:
    if key not in log:
        return "-"
    return f"{log[key]['first_quarter']:.3f} → {log[key]['last_quarter']:.3f}"


def _list(values: Iterable | None) -> str:
    if not values:
        return "-"
    values = list(values)
    return f"{np.mean(values):.1f} ({', '.join(str(v) for v in values)})"


def duration_text(seconds: float) -> str:
    """``1m05s`` / ``42s``."""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
