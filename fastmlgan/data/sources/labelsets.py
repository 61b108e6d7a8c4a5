"""A semi-synthetic label-dependency benchmark: real label sets, synthetic per-label evidence.

The paper's claim is about label dependency (§1, §4.2: "fork" with "knife" and "dining table"),
which the MULAN tables (6 labels, 1-2 per sample) barely have. This data set keeps the label sets
of a real multi-label collection (NUS-WIDE-81's 10,000 + 5,000 label vectors in
``../shared/data/nuswide81_lists``, or any list in that format) and replaces the images by noisy
per-label evidence. For a documented subset of labels, the *hidden* ones, the evidence is weak or
missing, so only their co-occurrence with the other labels can recover them.

**Input files.** One row per sample: a name without blanks, then C values 0/1, separated by
blanks (C is read from the first row; every row must have it). Blank lines are skipped; rows with
no label are kept, so the label matrix is exactly the file's rows. Class names: ``labelsets_names``,
or else ``concepts<C>.txt``, ``concepts.txt``, ``classes.txt`` or ``labels.txt`` beside the
training file (first found; one name a line), or else ``label0`` .. ``label<C-1>``.

**The noise model.** Y ∈ {0, 1}^{N×C} is the label matrix of a split, e ∈ [0, 1] the knob
``labelsets_evidence``, ρ ∈ [0, 1] ``labelsets_hidden_evidence``, H the hidden labels. Sample n's
feature vector x_n ∈ R^C has one evidence coordinate per label::

    x_nc = (d_c / 2) · (2 y_nc − 1) + ε_nc,      ε_nc ~ N(0, 1) i.i.d.
    d_c  = S · e          for a visible label (c ∉ H)
    d_c  = S · e · ρ      for a hidden label  (c ∈ H),      S = EVIDENCE_SCALE = 6

so x_nc is N(+d_c/2, 1) when label c is present and N(−d_c/2, 1) when it is absent, independently
of everything else given y_nc. d_c is the separation in noise standard deviations (d′). What the
evidence alone can tell about label c, as the AUC of a threshold on x_c, is Φ(d_c / √2); the best
threshold (0) misclassifies a share Φ(−d_c / 2) of the samples of either class:

    e       0      0.1    0.25   0.5    0.75   1
    AUC     0.5    0.66   0.86   0.983  0.9993 0.99999
    error   50%    38%    23%    6.7%   1.2%   0.13%

At e = 0 no feature carries information about any label. With ρ = 0 (the default) a hidden label's
own coordinate is pure noise at every e: what is known about it comes only through the other
labels' evidence and their co-occurrence with it. A model that predicts y_c from the features is
then at best P(y_c = 1 | the visible labels) — the label dependency the paper's D is meant to
capture.

**The hidden labels.** ``labelsets_hidden`` names them; otherwise the k = round(f · C) labels
(f = ``labelsets_hidden_fraction``) that the other labels predict best, chosen greedily on the
TRAINING label matrix only. With n_i the number of training samples carrying label i and n_ij
those carrying both i and j, the recoverability of i from the still-visible labels V is

    r_i = max_{j ∈ V, j ≠ i} n_ij / (n_j + κ),      κ = RECOVERABILITY_PSEUDOCOUNT = 10

(an estimate of P(i | j), shrunk towards 0 for rare partners j). Step t hides the visible label
with the largest r_i (ties: the lower index) and removes it from V. A label's partner is visible
when the label is hidden; a later step may hide that partner too (on NUS-WIDE-81, sunset and lake
are hidden after sky and water), and the label then leans on its best partner still visible. On
NUS-WIDE-81 with f = 0.2 this hides 16 labels, starting with animal (best partner: cat), sky
(sunset), water (lake), clouds, buildings (cityscape).

**Determinism.** The noise ε of a split is drawn with ``numpy.random.default_rng([NOISE_STREAM,
seed, split])`` (split 0: training, 1: evaluation) in row-major order, so the features are a pure
function of (Y, e, ρ, H, seed): the same arguments give bit-identical arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmlgan.data.sources.base import Source
from fastmlgan.data.sources.listfile import read_label_names
from fastmlgan.data.sources.tables import FeatureSet, read_text
from fastmlgan.errors import DataError

__all__ = [
    "EVIDENCE_SCALE",
    "LabelSetFeatures",
    "NoiseModel",
    "evidence_auc",
    "generate_evidence",
    "hidden_labels",
    "load_labelsets",
    "noise_model",
    "read_label_matrix",
]

EVIDENCE_SCALE = 6.0
"""S: the separation d′ (in noise standard deviations) of a visible label's evidence at e = 1."""
RECOVERABILITY_PSEUDOCOUNT = 10.0
"""κ in r_i: a partner label seen in few samples says little about P(i | j)."""
NOISE_STREAM = 20190513  # first entry of the noise seed sequence (any fixed constant)
NAME_FILES = ("concepts{C}.txt", "concepts.txt", "classes.txt", "labels.txt")


@dataclass(frozen=True)
class NoiseModel:
    """The parameters of the evidence (see the module docstring for the formulas)."""

    evidence: float = 0.75
    """e: what the evidence alone tells; a visible label's separation is d = S·e."""
    hidden_fraction: float = 0.2
    """f: share of the labels hidden when ``hidden`` is empty (chosen by recoverability)."""
    hidden_evidence: float = 0.0
    """ρ: a hidden label's evidence as a share of a visible one's (0: none at all)."""
    hidden: tuple[str, ...] = ()
    """Names of the hidden labels; empty: the greedy recoverability rule picks them."""
    seed: int = 0
    """Seed of the noise ε (independent of the training seed)."""

    def __post_init__(self) -> None:
        for name in ("evidence", "hidden_fraction", "hidden_evidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise DataError(f"--data.labelsets_{name} must be in [0, 1], got {value}")


@dataclass
class LabelSetFeatures(FeatureSet):
    """A ``FeatureSet`` whose features are synthetic evidence for real label sets."""

    hidden: tuple[int, ...] = ()
    """Indices of the hidden labels (weak or no evidence of their own)."""
    source: str = ""
    """The label-list file the rows come from."""


def read_label_matrix(path, num_classes: int | None = None, reference: str = "as on the first row") -> tuple[list[str], np.ndarray]:
    """(sample names, (N, C) uint8 labels) of a list file: a name then C values 0/1 per row. C is
    ``num_classes`` when given (``reference`` says where it comes from), else the first row's."""
    path = Path(path)
    text = read_text(path)
    names: list[str] = []
    rows: list[list[str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if num_classes is None:
            num_classes = len(tokens) - 1
            reference = "as on the first row"
            if num_classes < 1:
                raise DataError(f"{path}:{lineno}: a row needs a name and at least one 0/1 label value, got {line[:60]!r}")
        if len(tokens) != num_classes + 1:
            raise DataError(
                f"{path}:{lineno}: expected a name and {num_classes} label values ({reference}), "
                f"got {len(tokens) - 1} values"
            )
        values = tokens[1:]
        bad = next((v for v in values if v != "0" and v != "1"), None)
        if bad is not None:
            raise DataError(f"{path}:{lineno}: label value {bad!r} of {tokens[0]!r} is not 0 or 1")
        names.append(tokens[0])
        rows.append(values)
    if not rows:
        raise DataError(f"{path}: no rows (expected one sample a line: a name then 0/1 label values)")
    return names, np.array(rows, dtype=np.uint8)


def read_class_names(path, num_classes: int) -> list[str]:
    """One name a line (blank lines skipped); exactly ``num_classes`` distinct names."""
    names = read_label_names(path)
    if len(names) != num_classes:
        raise DataError(f"{path}: {len(names)} class names, but the label lists have {num_classes} columns")
    return names


def _class_names_beside(train_path: Path, num_classes: int) -> list[str]:
    for pattern in NAME_FILES:
        candidate = train_path.parent / pattern.format(C=num_classes)
        if candidate.is_file():
            return read_class_names(candidate, num_classes)
    return [f"label{c}" for c in range(num_classes)]


def hidden_labels(labels: np.ndarray, num_hidden: int, pseudocount: float = RECOVERABILITY_PSEUDOCOUNT) -> list[int]:
    """The greedy recoverability rule of the module docstring: ``num_hidden`` label indices, in the
    order they were hidden, each the visible label best predicted by a still-visible partner."""
    y = np.asarray(labels, dtype=np.float64)
    num_classes = y.shape[1]
    if not 0 <= num_hidden < num_classes:
        raise DataError(
            f"cannot hide {num_hidden} of {num_classes} labels (--data.labelsets_hidden_fraction or "
            "--data.labelsets_hidden): at least one must stay visible"
        )
    counts = y.sum(axis=0)
    pairs = y.T @ y
    # ratio[i, j] = n_ij / (n_j + κ): an estimate of P(i | j) shrunk for rare partners j.
    ratio = pairs / (counts[None, :] + pseudocount)
    np.fill_diagonal(ratio, -np.inf)
    visible = np.ones(num_classes, dtype=bool)
    order: list[int] = []
    for _ in range(num_hidden):
        score = np.where(visible[None, :], ratio, -np.inf).max(axis=1)
        score[~visible] = -np.inf
        chosen = int(np.argmax(score))  # first maximum: the lower index on ties
        order.append(chosen)
        visible[chosen] = False
    return order


def generate_evidence(labels: np.ndarray, hidden, noise: NoiseModel, split: int) -> np.ndarray:
    """(N, C) float32 evidence x_nc = (d_c/2)(2y_nc − 1) + ε_nc for the 0/1 ``labels``; a pure
    function of its arguments (the noise stream is [NOISE_STREAM, noise.seed, split])."""
    y = np.asarray(labels)
    separation = np.full(y.shape[1], EVIDENCE_SCALE * noise.evidence)
    separation[list(hidden)] *= noise.hidden_evidence
    rng = np.random.default_rng([NOISE_STREAM, noise.seed, split])
    eps = rng.standard_normal(y.shape)
    return (0.5 * separation[None, :] * (2.0 * y - 1.0) + eps).astype(np.float32)


def noise_model(data_cfg) -> NoiseModel:
    """The ``NoiseModel`` of a ``DataConfig``'s ``labelsets_*`` options."""
    hidden = tuple(n.strip() for n in data_cfg.labelsets_hidden.split(",") if n.strip())
    return NoiseModel(
        evidence=data_cfg.labelsets_evidence,
        hidden_fraction=data_cfg.labelsets_hidden_fraction,
        hidden_evidence=data_cfg.labelsets_hidden_evidence,
        hidden=hidden,
        seed=data_cfg.labelsets_seed,
    )


def evidence_auc(separation: float) -> float:
    """Φ(d / √2): the AUC of a threshold on one evidence coordinate with separation d."""
    return 0.5 * (1.0 + math.erf(separation / 2.0))


def load_labelsets(train_path, test_path, names_path: str | None = None, noise: NoiseModel | None = None):
    """(training, evaluation) ``LabelSetFeatures``: the two list files' label matrices with the
    evidence of ``noise``; the hidden labels are chosen on the training matrix."""
    noise = noise or NoiseModel()
    train_path, test_path = Path(train_path), Path(test_path)
    # The sample names only identify rows: the label matrices are what is used.
    _, train_y = read_label_matrix(train_path)
    num_classes = train_y.shape[1]
    _, test_y = read_label_matrix(test_path, num_classes, f"as the training list {train_path}")
    class_names = read_class_names(names_path, num_classes) if names_path else _class_names_beside(train_path, num_classes)
    if noise.hidden:
        unknown = [n for n in noise.hidden if n not in class_names]
        if unknown:
            raise DataError(
                f"--data.labelsets_hidden: {', '.join(map(repr, unknown))} not among the {num_classes} class names "
                f"(e.g. {', '.join(class_names[:5])})"
            )
        if len(set(noise.hidden)) == num_classes:
            raise DataError("--data.labelsets_hidden names every label: at least one must stay visible")
        hidden = [class_names.index(n) for n in dict.fromkeys(noise.hidden)]
    else:
        hidden = hidden_labels(train_y, int(round(noise.hidden_fraction * num_classes)))
    hidden = tuple(sorted(hidden))
    feature_names = [f"evidence:{name}" for name in class_names]
    common = dict(feature_names=feature_names, class_names=list(class_names), hidden=hidden)
    train = LabelSetFeatures(
        name=f"{train_path.stem}-labelsets", features=generate_evidence(train_y, hidden, noise, 0), labels=train_y,
        source=str(train_path), **common,
    )
    test = LabelSetFeatures(
        name=f"{test_path.stem}-labelsets", features=generate_evidence(test_y, hidden, noise, 1), labels=test_y,
        source=str(test_path), **common,
    )
    return train, test


def describe(split: LabelSetFeatures, noise: NoiseModel) -> dict:
    """What a results file records about the benchmark: the knob, the hidden labels, their AUCs."""
    visible_d = EVIDENCE_SCALE * noise.evidence
    return {
        "source": split.source,
        "evidence": noise.evidence,
        "hidden_evidence": noise.hidden_evidence,
        "seed": noise.seed,
        "hidden": [split.class_names[c] for c in split.hidden],
        "visible_separation": visible_d,
        "visible_auc": evidence_auc(visible_d),
        "hidden_auc": evidence_auc(visible_d * noise.hidden_evidence),
    }


class LabelsetsSource(Source):
    """Real label sets with synthetic evidence (``--data.dataset labelsets``, the mlp backbone)."""

    kind = "labelsets"
    required = ("labelsets_train", "labelsets_test")
    holds_features = True

    def read(self, cfg) -> tuple[LabelSetFeatures, LabelSetFeatures]:
        return load_labelsets(cfg.labelsets_train, cfg.labelsets_test, cfg.labelsets_names or None, noise_model(cfg))

    def title(self, cfg) -> str:
        source = Path(cfg.labelsets_train).parent.name or Path(cfg.labelsets_train).stem
        return f"labelsets ({source}, evidence {cfg.labelsets_evidence:g}, hidden evidence {cfg.labelsets_hidden_evidence:g})"
