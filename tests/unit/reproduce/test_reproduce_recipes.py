"""The harness's recipe rows (issue 21, item 5): ``asl`` and ``ema`` run a phase 1 of their own,
``asl_wgan`` starts phase 2 from ``asl``'s selected phase 1 with ASL as L_logistic, and the rows
that existed before them are unchanged by their presence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_reproduce import _argv, dataset  # noqa: F401 (the tiny MULAN table, a fixture)

import fastmlgan.losses
from fastmlgan.commands.reproduce import main
from fastmlgan.reproduce import protocol, runner, tables

RECIPES = "asl,baseline,wgan,asl_wgan,ema"  # asl first: the baseline must still be the first run


def _records(out: Path) -> dict[tuple[int, str], dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {(r["seed"], r["variant"]): r for r in rows}


@pytest.fixture(scope="module")
def recipe_run(dataset, tmp_path_factory):  # noqa: F811
    """One seed of the five recipe rows, with spies on ASL's calls (per row) and on the phase-1
    state each phase-2 row starts from."""
    out = tmp_path_factory.mktemp("recipes") / "out"
    current = {"row": None}
    asl_calls: dict[str, int] = {}
    starts: dict[str, dict] = {}
    real_asl = fastmlgan.losses.asymmetric_loss
    real_fit = runner.SelectingTrainer.fit
    real_start = runner.SelectingTrainer.start_from_baseline

    def asl_spy(*args, **kwargs):
        asl_calls[current["row"]] = asl_calls.get(current["row"], 0) + 1
        return real_asl(*args, **kwargs)

    def fit_spy(self):
        current["row"] = Path(self.out_dir).name
        return real_fit(self)

    def start_spy(self, state):
        starts[Path(self.out_dir).name] = {k: v.clone() for k, v in state["generator"].items()}
        return real_start(self, state)

    mp = pytest.MonkeyPatch()
    mp.setattr(fastmlgan.losses, "asymmetric_loss", asl_spy)
    mp.setattr(runner.SelectingTrainer, "fit", fit_spy)
    mp.setattr(runner.SelectingTrainer, "start_from_baseline", start_spy)
    try:
        assert main(_argv(dataset, out, extra=("--seeds", "1", "--variants", RECIPES, "--no-plots"))) == 0
    finally:
        mp.undo()
    return out, asl_calls, starts


def test_asl_is_the_loss_of_the_asl_rows_only(recipe_run):
    out, asl_calls, _ = recipe_run
    records = _records(out)
    # Phase 1 of asl and phases 1 (none: it starts from asl's) and 2 of asl_wgan call ASL; no other row does.
    assert asl_calls.get("asl", 0) > 0 and asl_calls.get("asl_wgan", 0) > 0, asl_calls
    assert set(asl_calls) == {"asl", "asl_wgan"}, asl_calls
    kinds = {v: records[(0, v)]["config"]["loss"]["kind"] for v in RECIPES.split(",")}
    assert kinds == {"asl": "asl", "asl_wgan": "asl", "baseline": "bce", "wgan": "bce", "ema": "bce"}
    assert records[(0, "asl")]["config"]["gan"]["enable"] is False
    assert records[(0, "asl_wgan")]["config"]["gan"]["enable"] is True
    assert records[(0, "asl")]["phase1_overrides"] == {"loss.kind": "asl"}
    assert "phase1_overrides" not in records[(0, "baseline")]  # older rows' records keep their keys


def test_asl_wgan_starts_from_the_asl_rows_selected_phase_1(recipe_run):
    out, _, starts = recipe_run
    records = _records(out)
    for row, phase1 in (("asl_wgan", "asl"), ("wgan", "baseline")):
        saved = torch.load(out / "runs" / "seed0" / phase1 / "selected.pt", weights_only=True)["generator"]
        assert starts[row].keys() == saved.keys()
        assert all(torch.equal(starts[row][k], saved[k]) for k in saved), row
        assert records[(0, row)]["selected_epochs"]["bce"] == records[(0, phase1)]["selected_epochs"]["bce"]
    # Different losses give different phase-1 weights: the check above can tell the two apart.
    base = torch.load(out / "runs" / "seed0" / "baseline" / "selected.pt", weights_only=True)["generator"]
    assert any(not torch.equal(starts["asl_wgan"][k], base[k]) for k in base)


def test_the_ema_row_reports_the_weight_average(recipe_run):
    out, _, _ = recipe_run
    records = _records(out)
    ema, base = records[(0, "ema")], records[(0, "baseline")]
    assert ema["config"]["train"]["ema_decay"] == protocol.VARIANTS["ema"].phase1["train.ema_decay"] > 0
    # The average never feeds back into training: G's raw weights follow the baseline's exactly,
    # so a row that scored G's raw weights would have the baseline's validation curve.
    state = torch.load(out / "runs" / "seed0" / "ema" / "selected.pt", weights_only=True)
    assert state["ema"]["updates"] > 0
    assert ema["val_curve"] != base["val_curve"]
    # The row's test scores are the average's: predict them again from the saved selected state.
    scores = _rescore(out, ema, state["ema"]["weights"])
    saved = torch.from_numpy(__import__("numpy").load(out / "runs" / "seed0" / "ema" / "test_scores.npz")["scores"])
    torch.testing.assert_close(scores, saved)
    raw = _rescore(out, ema, state["generator"])
    assert not torch.allclose(raw, saved)


def _rescore(out: Path, record: dict, weights: dict) -> torch.Tensor:
    """σ(G(x)) of the test split with ``weights``, through a fresh harness trainer of the row's config."""
    from fastmlgan.config import config_from_dict
    from fastmlgan.distributed import DistInfo

    cfg = config_from_dict(record["config"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    splits, test, _ = protocol.seed_splits(cfg.data, info, 0.2, 0)
    trainer = runner.SelectingTrainer(cfg, info, out / "rescore", splits, keep="generator")
    trainer.steps.generator.load_state_dict(weights)
    scores, _ = runner._predict_on(trainer, test)
    return torch.from_numpy(scores)


def test_the_existing_rows_are_unchanged_by_the_new_ones(recipe_run, dataset, tmp_path):  # noqa: F811
    out, _, _ = recipe_run
    alone = tmp_path / "alone"
    assert main(_argv(dataset, alone, extra=("--seeds", "1", "--variants", "baseline,wgan", "--no-plots"))) == 0
    with_recipes, without = _records(out), _records(alone)
    for key in ((0, "baseline"), (0, "wgan")):
        for field in ("val_curve", "val", "test", "selected_epochs", "mechanism"):
            assert with_recipes[key][field] == without[key][field], (key, field)


def test_references_of_the_rows():
    refs = {name: tables._references(name) for name in protocol.VARIANTS}
    assert refs["baseline"] == []
    assert refs["wgan"] == ["baseline", "bce_continued"]
    assert refs["no_negative"] == ["baseline", "wgan", "bce_continued"]
    assert refs["bce_continued"] == ["baseline", "wgan"]
    assert refs["asl"] == refs["ema"] == ["baseline"]
    assert refs["asl_wgan"] == ["baseline", "asl", "wgan", "bce_continued"]


def test_phase1_overrides_of_each_row():
    v = protocol.VARIANTS
    assert v["baseline"].phase1_overrides() == v["wgan"].phase1_overrides() == {}
    assert v["asl"].phase1_overrides() == v["asl_wgan"].phase1_overrides() == {"loss.kind": "asl"}
    assert v["asl_wgan"].phase1_row() == "asl" and v["asl"].phase1_row() == "asl"
    assert v["no_gumbel"].phase1_row() == "baseline"


def test_a_record_of_another_phase_1_is_not_reused(tmp_path):
    path = tmp_path / "results.jsonl"
    good = {"seed": 0, "variant": "asl", "overrides": None, "adversarial": True, "phase1_overrides": {"loss.kind": "asl"}}
    stale = {**good, "seed": 1, "phase1_overrides": {"loss.kind": "asl", "loss.gamma_neg": 2}}
    old = {**good, "seed": 2}
    del old["phase1_overrides"]
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, stale, old)))
    assert set(runner.RecordFile(path).load()) == {(0, "asl")}
