"""The reproduction harness: Tables 1 and 3 of Tsai & Lee over several seeds, with every choice
made on a validation split carved from the training data and the test split used once.

    fastmlgan reproduce --preset reproduce-mulan \\
        --data.features_train scene-train.arff --data.features_test scene-test.arff \\
        --data.features_xml scene.xml --seeds 5 --out docs/results/scene

Dataset, model and GAN options are those of ``fastmlgan train``; the harness adds ``--seeds``,
``--out``, ``--variants``, ``--val-fraction``, ``--threads``, ``--no-plots`` and ``--verbose``.

Protocol (also written into ``results.json`` and ``results.md``), for every seed s:

1. **Split.** ``val_fraction`` of the training split, drawn with ``numpy.random.default_rng
   ([VAL_STREAM, s])``, is held out for validation; the rest (the *fit* split) is all that G and D
   are trained on. The evaluation split of the config (``--data.features_test``, the COCO/embedded
   val set) is the *test* split: it is read once per (seed, variant), after selection.
2. **Phase 1** (the baseline row): BCE training of G for up to ``train.bce_epochs`` epochs,
   evaluated on the validation split every ``train.eval_every`` epochs. The selected phase-1
   epoch is the evaluated one with the highest validation C-F1 (ties: the earliest).
3. **Phase 2**, one run per variant, all starting from the selected phase-1 state (``Trainer.
   start_from_baseline``, fresh D): up to ``train.gan_epochs`` epochs, the selected GAN epoch
   chosen by the same rule among epochs >= 1 (0 would be the baseline itself).
4. **Test.** The selected G of each row is evaluated once on the test split.

Finished (seed, variant) rows are appended to ``results.jsonl`` as they finish; a rerun with the
same ``--out`` skips them (and refuses a config that differs from the one they were run with).
Per-run folders (logs, the selected phase-1 state, test scores) are under ``runs/``, which the
``.gitignore`` written into ``--out`` keeps out of commits.

Layout (each module imports only the ones above it):

- ``protocol``: the rows (``VARIANTS``), the validation split, the selection rule;
- ``diagnostics``: what the critic did in a GAN row;
- ``tables``: ``results.json`` (``summarize``) and ``results.md`` (``render_markdown``);
- ``plots``: the PNGs (matplotlib, imported only when plots are written);
- ``runner``: ``SelectingTrainer`` (a Trainer keeping its validation curve), ``LogisticControlSteps``
  (the control row's steps) and ``Harness``, the resumable loop over seeds and rows;
- ``sweep``: one row across several results folders.

The command line is ``fastmlgan reproduce`` (``commands/reproduce.py``; also ``python -m
fastmlgan.reproduce``) and ``fastmlgan sweep``.
"""

from fastmlgan.reproduce.protocol import (
    DEFAULT_VARIANTS,
    SELECTION_KEY,
    SELECTION_RULE,
    TABLE_VARIANTS,
    VAL_STREAM,
    VARIANTS,
    HarnessOptions,
    Variant,
    carve_validation,
    select_epoch,
)
from fastmlgan.reproduce.runner import Harness, SelectingTrainer
from fastmlgan.reproduce.tables import paired_difference, render_markdown, summarize

__all__ = [
    "DEFAULT_VARIANTS",
    "SELECTION_KEY",
    "SELECTION_RULE",
    "TABLE_VARIANTS",
    "VAL_STREAM",
    "VARIANTS",
    "Harness",
    "HarnessOptions",
    "SelectingTrainer",
    "Variant",
    "carve_validation",
    "paired_difference",
    "render_markdown",
    "select_epoch",
    "summarize",
]
