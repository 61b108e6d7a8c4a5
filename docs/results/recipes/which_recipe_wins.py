"""docs/results.md's "Which recipe wins" table, from the harness's results.json of each folder here.

    python docs/results/recipes/which_recipe_wins.py docs/results/recipes/{emotions,scene,embedded}

A recipe is a row (baseline, wgan, asl, asl_wgan, ema) at a threshold: 0.5, or tuned on the row's
validation split (one global threshold maximising C-F1, or one per class maximising its F1:
``reproduce.mechanism``). The winner is the recipe with the highest mean test C-F1 over the seeds
all rows ran; its margin is the paired difference (same seed = same split) to the runner-up and to
the baseline at 0.5 and at the winner's threshold mode, in standard errors (SE = sample SD / sqrt(n)). Picking the winner by test
means favours it: a margin under 2 SE is no evidence of a difference. The cost of a recipe is
the wall time of its phase 1 (its own or the baseline's) plus its phase 2, mean per seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROWS = ("baseline", "wgan", "asl", "asl_wgan", "ema")
PHASE1 = {"baseline": "baseline", "wgan": "baseline", "asl": "asl", "asl_wgan": "asl", "ema": "ema"}
MODES = {"0.5": None, "tuned global": "tuned_global/C-F1", "tuned per class": "tuned_per_class/C-F1"}


def per_seed(variant: dict, key: str | None) -> dict[int, float]:
    values = variant["test"]["per_seed"]["C-F1"] if key is None else variant["mechanism"]["per_seed"][key]
    return dict(zip(variant["seeds"], values))


def recipe_table(folder: Path) -> list[str]:
    results = json.loads((folder / "results.json").read_text())
    variants = results["variants"]
    rows = [r for r in ROWS if r in variants]
    seeds = sorted(set.intersection(*(set(variants[r]["seeds"]) for r in rows)))
    wall = {r: variants[r]["wall_s"] / len(variants[r]["seeds"]) for r in rows}
    recipes = {}
    for r in rows:
        for mode, key in MODES.items():
            values = per_seed(variants[r], key)
            recipes[(r, mode)] = np.array([values[s] for s in seeds])
    ranked = sorted(recipes, key=lambda k: -recipes[k].mean())
    best, second = ranked[0], ranked[1]

    def margin(a, b) -> str:
        d = recipes[a] - recipes[b]
        if len(d) < 3:  # a standard error from one or two seeds means nothing
            return f"{d.mean():+.2f} (n = {len(d)}, no SE)"
        se = d.std(ddof=1) / np.sqrt(len(d))
        return f"{d.mean():+.2f} ({d.mean() / se:+.1f} SE)" if se > 0 else f"{d.mean():+.2f}"

    cost = {r: wall[PHASE1[r]] + (wall[r] if r != PHASE1[r] else 0.0) for r in rows}
    cells = []
    for r in rows:
        means = " / ".join(f"{recipes[(r, m)].mean():.1f}" for m in MODES)
        cells.append(f"{r} {means} [{cost[r]:.0f} s]")
    return [
        f"| {results['dataset']} | {len(seeds)} | **{best[0]} @ {best[1]}** {recipes[best].mean():.1f} "
        f"| {second[0]} @ {second[1]}: {margin(best, second)} | {margin(best, ('baseline', '0.5'))} "
        f"| {margin(best, ('baseline', best[1])) if best[0] != 'baseline' else '-'} "
        f"| {'<br>'.join(cells)} |"
    ]


def main(folders: list[str]) -> None:
    print("| data set | seeds | winner (test C-F1) | vs runner-up | vs baseline @ 0.5 | vs baseline at the winner's threshold "
          "| C-F1 @ 0.5 / tuned global / tuned per class [wall s per seed] |")
    print("|---|---|---|---|---|---|---|")
    for folder in folders:
        for line in recipe_table(Path(folder)):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
