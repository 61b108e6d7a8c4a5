"""The reproduction harness end to end on a tiny feature table with a planted label dependency:
the aggregation (mean/std/per-seed, paired differences), results.md, test-split isolation, and
skipping finished rows on a rerun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from extras import import_extra
from paper_settings import PAPER_SETTING_IDS, PAPER_SETTINGS, check_setting

from fastmlgan.commands.reproduce import main, parse_harness_args
from fastmlgan.config import PRESETS, build_config
from fastmlgan.errors import ConfigError
from fastmlgan.reproduce import protocol, runner, tables

NUM_FEATURES, NUM_LABELS = 8, 4
NUM_TRAIN, NUM_TEST = 150, 70
SEEDS = (0, 1)


def _table(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels from three latent groups ({0,1}, {2,3}, {1,2}: pairs that co-occur), features a noisy
    view of the labels."""
    groups = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]])
    labels = groups[rng.integers(0, 3, n)]
    drop = rng.random((n, NUM_LABELS)) < 0.15  # a label now and then missing: the dependency helps
    labels = np.where(drop & (labels.sum(1, keepdims=True) > 1), 0, labels)
    mix = rng.normal(size=(NUM_LABELS, NUM_FEATURES))
    features = labels @ mix + rng.normal(scale=1.2, size=(n, NUM_FEATURES))
    return features, labels


def _write_arff(path: Path, features: np.ndarray, labels: np.ndarray) -> Path:
    lines = ["@relation tiny", ""]
    lines += [f"@attribute f{i} numeric" for i in range(NUM_FEATURES)]
    lines += [f"@attribute l{i} {{0,1}}" for i in range(NUM_LABELS)]
    lines += ["", "@data"]
    for x, y in zip(features, labels):
        lines.append(",".join([*(f"{v:.5f}" for v in x), *(str(int(v)) for v in y)]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    train_x, train_y = _table(rng, NUM_TRAIN)
    test_x, test_y = _table(rng, NUM_TEST)
    body = "\n".join(f'<label name="l{i}"></label>' for i in range(NUM_LABELS))
    xml = root / "tiny.xml"
    xml.write_text(
        f'<?xml version="1.0" encoding="utf-8"?>\n<labels xmlns="http://mulan.sourceforge.net/labels">\n{body}\n</labels>\n'
    )
    return {
        "train": _write_arff(root / "tiny-train.arff", train_x, train_y),
        "test": _write_arff(root / "tiny-test.arff", test_x, test_y),
        # The same test rows with every label flipped: if selection looked at the test split, it
        # would choose differently here.
        "test_flipped": _write_arff(root / "tiny-flipped.arff", test_x, 1 - test_y),
        "xml": xml,
    }


def _argv(dataset: dict[str, Path], out: Path, test: str = "test", extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "--data.dataset", "features",
        "--model.backbone", "mlp",
        "--data.features_train", str(dataset["train"]),
        "--data.features_test", str(dataset[test]),
        "--data.features_xml", str(dataset["xml"]),
        "--data.batch_size", "8",
        "--model.width", "16",
        "--gan.proj_dim", "8",
        "--gan.hidden_dim", "16",
        "--gan.num_layers", "2",
        "--optim.bce_lr", "1e-2",
        "--optim.g_lr", "1e-3",
        "--train.bce_epochs", "5",
        "--train.gan_epochs", "4",
        "--seeds", ",".join(map(str, SEEDS)),
        "--out", str(out),
        *extra,
    ]  # fmt: skip


class SelectionSpy:
    """Wraps ``protocol.select_epoch`` and keeps every curve point it was shown."""

    def __init__(self) -> None:
        self.points: list[dict] = []

    def __call__(self, curve, min_epoch=1):
        self.points.extend(curve)
        return _real_select_epoch(curve, min_epoch)


_real_select_epoch = protocol.select_epoch


@pytest.fixture(scope="module")
def harness_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    spy = SelectionSpy()
    mp = pytest.MonkeyPatch()
    mp.setattr(protocol, "select_epoch", spy)
    try:
        assert main(_argv(dataset, out)) == 0
    finally:
        mp.undo()
    return out, spy


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_results_json_has_every_variant_with_mean_std_and_per_seed(harness_run):
    out, _ = harness_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == list(protocol.DEFAULT_VARIANTS)
    records = {(r["seed"], r["variant"]): r for r in _records(out)}
    assert len(records) == len(SEEDS) * len(protocol.DEFAULT_VARIANTS)
    for name, entry in results["variants"].items():
        test = entry["test"]
        for key in ("C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1", "mAP", "avg_labels", "cooc_dist"):
            assert key in test["mean"], (name, key)
        assert {f"top3/{k}" for k in ("C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1")} <= set(test["mean"])
        for key, values in test["per_seed"].items():
            assert len(values) == len(SEEDS)
            assert test["mean"][key] == pytest.approx(np.mean(values))
            assert test["std"][key] == pytest.approx(np.std(values))
        # The per-seed values are the rows' own test metrics, in seed order.
        assert test["per_seed"]["C-F1"] == [records[(s, name)]["test"]["C-F1"] for s in SEEDS]
        assert test["per_seed"]["top3/O-F1"] == [records[(s, name)]["test"]["top3"]["O-F1"] for s in SEEDS]
        assert entry["config"]["data"]["features_train"].endswith("tiny-train.arff")
    # Paired difference, by hand: mean and standard error of the per-seed differences.
    diff = results["variants"]["wgan"]["diff_vs_baseline"]["C-F1"]
    d = [records[(s, "wgan")]["test"]["C-F1"] - records[(s, "baseline")]["test"]["C-F1"] for s in SEEDS]
    assert diff["mean"] == pytest.approx(np.mean(d))
    assert diff["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(len(d)))
    assert diff["exceeds_2se"] == (abs(np.mean(d)) > 2 * diff["se"])
    # Every GAN row starts from its seed's one phase-1 run.
    for s in SEEDS:
        bce = records[(s, "baseline")]["selected_epochs"]["bce"]
        assert all(records[(s, v)]["selected_epochs"]["bce"] == bce for v in protocol.DEFAULT_VARIANTS)
        assert all(1 <= records[(s, v)]["selected_epochs"]["gan"] <= 4 for v in protocol.DEFAULT_VARIANTS[1:])
    assert "selection_rule" in results["protocol"] and "default_rng" in results["protocol"]["split"]


def test_results_md_has_the_tables(harness_run):
    out, _ = harness_run
    md = (out / "results.md").read_text()
    assert "| Methods | C-P | C-R | C-F1 | O-P | O-R | O-F1 | mAP | labels/img |" in md
    results = json.loads((out / "results.json").read_text())
    for entry in results["variants"].values():
        mean, std = entry["test"]["mean"]["C-F1"], entry["test"]["std"]["C-F1"]
        assert f"| {entry['label']} | " in md
        assert f"{mean:.1f} ± {std:.1f}" in md
    for row in ("| (a) | baseline", "| (b) | + WGAN-gp", "| (c) |", "| (d) |", "| (e) |"):
        assert row in md
    assert "Command: `fastmlgan reproduce" in md and "Git revision" in md and "Wall time" in md
    assert "validation" in md and "C-F1" in md


def test_plots_are_written_and_small(harness_run):
    import_extra("plots", "matplotlib")
    out, _ = harness_run
    results = json.loads((out / "results.json").read_text())
    assert set(results["plots"]) == {"f1", "labels_per_image", "cooccurrence"}
    md = (out / "results.md").read_text()
    for name in results["plots"].values():
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000
        assert f"]({name})" in md


def test_selection_only_sees_the_validation_split(harness_run, dataset, tmp_path, monkeypatch):
    out, spy = harness_run
    records = _records(out)
    sizes = records[0]["split"]
    assert sizes["val_rows"] + sizes["fit_rows"] == NUM_TRAIN and sizes["test_rows"] == NUM_TEST
    # Every metric the selection rule was shown was computed on the validation rows.
    assert spy.points and {p["num_images"] for p in spy.points} == {sizes["val_rows"]}
    for s in SEEDS:
        fit, val = protocol.carve_validation(NUM_TRAIN, 0.2, s)
        assert not set(fit) & set(val) and sorted([*fit, *val]) == list(range(NUM_TRAIN))

    # The same runs against a test split whose labels are all flipped: identical selections and
    # validation scores, different test scores.
    flipped_out = tmp_path / "flipped"
    assert main(_argv(dataset, flipped_out, test="test_flipped", extra=("--no-plots",))) == 0
    flipped = {(r["seed"], r["variant"]): r for r in _records(flipped_out)}
    for r in records:
        other = flipped[(r["seed"], r["variant"])]
        assert other["selected_epochs"] == r["selected_epochs"]
        assert other["val"]["C-F1"] == r["val"]["C-F1"]
        assert other["val_curve"] == r["val_curve"]
        assert other["test"]["C-F1"] != pytest.approx(r["test"]["C-F1"])


def test_rerun_skips_finished_rows_and_redoes_a_lost_one(harness_run, dataset, tmp_path, monkeypatch):
    import shutil

    src, _ = harness_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    lines = (out / "results.jsonl").read_text().splitlines()
    fits: list[str] = []
    real_fit = runner.SelectingTrainer.fit

    def counting_fit(self):
        fits.append(self.cfg.out)
        return real_fit(self)

    monkeypatch.setattr(runner.SelectingTrainer, "fit", counting_fit)
    assert main(_argv(dataset, out, extra=("--no-plots",))) == 0
    assert fits == [] and (out / "results.jsonl").read_text().splitlines() == lines

    # A crash lost the last row (and left half a line): only that row runs again.
    last = json.loads(lines[-1])
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + '\n{"seed": 1, "vari')
    assert main(_argv(dataset, out, extra=("--no-plots",))) == 0
    assert [Path(p).name for p in fits] == [last["variant"]]
    again = {(r["seed"], r["variant"]): r for r in _records_tolerant(out)}
    rerun = again[(last["seed"], last["variant"])]
    assert (
        rerun["test"]["C-F1"] == pytest.approx(last["test"]["C-F1"])
        and rerun["selected_epochs"] == last["selected_epochs"]
    )


def _records_tolerant(out: Path) -> list[dict]:
    rows = []
    for line in (out / "results.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def test_a_row_does_not_depend_on_the_rows_run_before_it(harness_run, dataset, tmp_path):
    # In the shared run no_gumbel comes after three other GAN rows of its seed; alone it must give
    # the same curve (each row starts from a copy of the phase-1 state, optimizer moments included).
    src, _ = harness_run
    out = tmp_path / "alone"
    assert main(_argv(dataset, out, extra=("--variants", "no_gumbel", "--no-plots"))) == 0
    shared = {(r["seed"], r["variant"]): r for r in _records(src)}
    for r in _records(out):
        assert r["val_curve"] == shared[(r["seed"], r["variant"])]["val_curve"], r["variant"]


def test_rerun_with_another_config_is_refused(harness_run, dataset, tmp_path, capsys):
    import shutil

    src, _ = harness_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    assert main(_argv(dataset, out, extra=("--train.gan_epochs", "7", "--no-plots"))) == 2
    assert "train.gan_epochs: 4 -> 7" in capsys.readouterr().err


def test_select_epoch_rule():
    curve = [{"epoch": e, "C-F1": f} for e, f in ((0, 90.0), (1, 50.0), (2, 60.0), (3, 60.0), (4, 55.0))]
    assert protocol.select_epoch(curve)["epoch"] == 2  # the earliest of the tied best, epoch 0 excluded
    assert protocol.select_epoch(curve, min_epoch=0)["epoch"] == 0
    assert protocol.select_epoch([], 1) is None


def test_paired_difference_by_hand():
    d = tables.paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # differences 2, 3, 1
    assert d["mean"] == pytest.approx(2.0) and d["sd"] == pytest.approx(1.0)
    assert d["se"] == pytest.approx(1.0 / math.sqrt(3)) and d["exceeds_2se"] is True
    assert tables.paired_difference([1.0], [0.0])["se"] is None


def test_harness_options():
    opts, cfg = parse_harness_args(
        ["--preset", "reproduce-mulan", "--seeds", "3", "--variants", "wgan,no_gumbel", "--val-fraction=0.25"]
    )
    assert opts.seeds == [0, 1, 2] and opts.variants == ["baseline", "wgan", "no_gumbel"]
    assert opts.val_fraction == 0.25 and cfg.model.backbone == "mlp"
    assert parse_harness_args(["--seeds", "4,9"])[0].seeds == [4, 9]
    for bad in (["--variants", "nope"], ["--seeds", "0"], ["--val-fraction", "1.5"]):
        with pytest.raises(ConfigError):
            parse_harness_args(bad)


PAPER_PRESETS = [f"paper-{d}-{b}" for d in ("coco", "nuswide") for b in ("vgg16", "inception_v3", "resnet101", "resnet152")]


@pytest.mark.parametrize("name", PAPER_PRESETS)
@pytest.mark.parametrize("option, quote, parse", PAPER_SETTINGS, ids=PAPER_SETTING_IDS)
def test_paper_presets_follow_section_4_1(name, option, quote, parse):
    # Each §4.1 value is spelled out in the preset (it reads as the recipe) and reaches the resolved
    # config; checked against a sentence quoted from the paper.
    assert option in PRESETS[name](), f"{name} does not spell out {option}"
    section, key = option.split(".")
    check_setting(option, quote, parse, getattr(getattr(build_config({}, preset=name), section), key))


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_name_their_dataset_and_backbone(name):
    _, dataset, backbone = name.split("-")
    cfg = build_config({}, preset=name)
    assert (cfg.data.dataset, cfg.model.backbone) == (dataset, backbone)
    # "The generator was pretrained on ImageNet with 1000 categories" (§4.1)
    assert cfg.model.pretrained.startswith("IMAGENET1K")
    assert cfg.train.bce_epochs > 0 and cfg.train.gan_epochs > 0  # stated, not defaults
    assert "paper's C-F1/O-F1" in PRESETS[name].__doc__


def test_pretrained_f_ext_features_are_computed_once_for_every_row_and_seed(tmp_path):
    """With pretrained weights f_ext is one network in every run: the harness builds the
    frozen-feature cache once, over the whole training split, and every row of every seed reads it
    (each seed's fit split is a subset of that split)."""
    import torch
    import torchvision

    from fastmlgan.data.sources import embedded
    from fastmlgan.train import feature_cache

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # stands in for ImageNet weights
    root = tmp_path / "embedded"
    embedded.ensure(root, num_train=60, num_val=24, image_size=40, seed=0)
    out = tmp_path / "out"
    argv = [
        "--preset", "reproduce-embedded", "--data.root", str(root), "--data.embedded_num_train", "60",
        "--data.embedded_num_val", "24", "--data.batch_size", "4", "--data.eval_batch_size", "24",
        "--model.backbone", "resnet18", "--model.pretrained", str(weights),
        "--gan.proj_dim", "8", "--gan.hidden_dim", "16", "--gan.num_layers", "2",
        "--train.bce_epochs", "1", "--train.gan_epochs", "1",
        "--seeds", "0,1", "--variants", "baseline,wgan,bce_continued", "--out", str(out),
    ]  # fmt: skip
    built = []
    real_build = feature_cache.build
    mp = pytest.MonkeyPatch()
    mp.setattr(feature_cache, "build", lambda *a, **k: built.append(a[0]) or real_build(*a, **k))
    try:
        assert main(argv) == 0
    finally:
        mp.undo()
    cache_path = out / "features.cache"
    assert built == [cache_path]
    cache = feature_cache.FeatureCache.open(cache_path)
    assert cache.header["num_images"] == 60  # the whole training split, not a seed's fit split
    for seed in (0, 1):
        run = out / "runs" / f"seed{seed}" / "wgan"
        assert json.loads((run / "config.json").read_text())["gan"]["feature_cache"] == str(cache_path)
        assert "f_ext is read from it" in (run / "train.log").read_text()
