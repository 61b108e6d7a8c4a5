"""FASTMLGAN_KERNELS=auto: the committed dispatch table, the rule that derives it from benchmark
results (bench/kernels.py --write-dispatch), and how the ops follow it in eager and compiled mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastmlgan.errors import ConfigError
from fastmlgan.kernels import _dispatch

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "bench"))

import kernels as bench  # noqa: E402  (bench/kernels.py)


def _row(op, mode, path, ms, case="case", size="s", variant=None):
    return {"case": case, "size": size, "variant": variant or f"{path} {mode}", "op": op, "path": path,
            "mode": mode, "median_ms": ms}  # fmt: skip


def test_committed_table_is_derived_from_its_committed_results():
    # Nobody edits dispatch.json by hand: each device's paths are what the rule gives on the
    # results file it names, and its device and versions are that file's.
    table = json.loads(_dispatch.DISPATCH_TABLE.read_text())
    assert {"cpu", "cuda"} <= table["devices"].keys()
    for device_type, entry in table["devices"].items():
        record = json.loads((REPO_ROOT / entry["source"]).read_text())
        assert record["device_arg"].split(":")[0] == device_type
        assert (entry["device"], entry["torch"], entry["date"]) == (record["device"], record["torch"], record["date"])
        derived = bench.choose_paths(record["results"])
        for op in _dispatch.OPS:
            for mode in _dispatch.MODES:
                assert entry["ops"][op][mode]["path"] == derived[op][mode]["path"], (device_type, op, mode)
    # What the package reads is that table.
    assert _dispatch.read_dispatch_table() == {
        f"{d}/{op}/{mode}": table["devices"][d]["ops"][op][mode]["path"]
        for d in table["devices"]
        for op in _dispatch.OPS
        for mode in _dispatch.MODES
    }


def test_rule_takes_triton_only_where_it_is_faster():
    rows = [
        # gumbel eager: Triton 10% faster at one size, 30% slower at the other: geometric mean > 1.
        _row("gumbel_sigmoid", "eager", "torch", 1.0, size="a"),
        _row("gumbel_sigmoid", "eager", "triton", 0.9, size="a"),
        _row("gumbel_sigmoid", "eager", "torch", 1.0, size="b"),
        _row("gumbel_sigmoid", "eager", "triton", 1.3, size="b"),
        # gumbel compiled: the fastest torch row counts (two torch variants), Triton beats it.
        _row("gumbel_sigmoid", "compiled", "torch", 2.0, variant="slow torch"),
        _row("gumbel_sigmoid", "compiled", "torch", 1.0, variant="fast torch"),
        _row("gumbel_sigmoid", "compiled", "triton", 0.8),
        # a row no dispatch choice runs (path None) never counts, however fast.
        _row("gumbel_sigmoid", "compiled", None, 0.01),
        # penalty compiled: a tie keeps the reference.
        _row("gradient_penalty", "compiled", "torch", 4.0),
        _row("gradient_penalty", "compiled", "triton", 4.0),
        # penalty eager: torch only (as on CPU).
        _row("gradient_penalty", "eager", "torch", 3.0),
    ]
    table = bench.choose_paths(rows)
    assert table["gumbel_sigmoid"]["eager"]["path"] == "torch"
    assert table["gumbel_sigmoid"]["eager"]["triton_over_torch"] == {"case a": 0.9, "case b": 1.3}
    assert table["gumbel_sigmoid"]["compiled"]["path"] == "triton"
    assert table["gumbel_sigmoid"]["compiled"]["triton_over_torch"] == {"case s": 0.8}
    assert table["gradient_penalty"]["compiled"]["path"] == "torch"
    assert table["gradient_penalty"]["eager"]["path"] == "torch"
    assert "no Triton row" in table["gradient_penalty"]["eager"]["why"]


def test_write_dispatch_merges_one_device_and_reports_changes(tmp_path, capsys):
    results = tmp_path / "kernels-gpu.json"
    record = {"device_arg": "cuda:0", "device": "GPU X", "torch": "9.9", "triton": "9.9", "git_revision": "abc",
              "command": "bench/kernels.py --device cuda", "date": "2030-01-01",
              "results": [_row("gumbel_sigmoid", "eager", "torch", 2.0), _row("gumbel_sigmoid", "eager", "triton", 1.0)]}  # fmt: skip
    results.write_text(json.dumps(record))
    out = tmp_path / "dispatch.json"
    bench.write_dispatch([results], out, ["--write-dispatch", str(results)])
    paths = _dispatch.read_dispatch_table(out)
    assert paths["cuda/gumbel_sigmoid/eager"] == "triton"
    assert paths["cuda/gradient_penalty/compiled"] == "torch"  # not measured in the new file
    # The CPU entry is carried over from the package's table.
    assert {k: v for k, v in paths.items() if k.startswith("cpu/")} == {
        k: v for k, v in _dispatch.read_dispatch_table().items() if k.startswith("cpu/")
    }
    printed = capsys.readouterr().out
    assert "cuda/gumbel_sigmoid/eager: torch -> triton" in printed


def test_broken_table_is_a_config_error_naming_the_file(tmp_path):
    bad = tmp_path / "dispatch.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="dispatch.json"):
        _dispatch.read_dispatch_table(bad)
    bad.write_text(json.dumps({"devices": {"cuda": {"ops": {"gumbel_sigmoid": {"eager": {"path": "cuda"}}}}}}))
    with pytest.raises(ConfigError, match="devices.cuda.ops.gumbel_sigmoid.eager"):
        _dispatch.read_dispatch_table(bad)


def test_auto_follows_the_table_per_device_and_mode(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(_dispatch, "_AUTO_PATHS", {"cpu/gumbel_sigmoid/compiled": "triton"})
    x = torch.zeros(3)

    def marked(x):
        return x + (1.0 if _dispatch.choose_path("gumbel_sigmoid", x) == "triton" else 0.0)

    assert _dispatch.choose_path("gumbel_sigmoid", x) == "torch"  # eager: no entry
    if _dispatch.HAS_TRITON and _dispatch.triton_interpreter_active():
        assert torch.equal(torch.compile(marked, backend="eager", fullgraph=True)(x), torch.ones(3))
    assert _dispatch.choose_path("gradient_penalty", x) == "torch"
    assert _dispatch.auto_path("gumbel_sigmoid", "mps", "eager") == "torch"  # unmeasured device type
    # A forced backend wins over the table. (Dynamo does not notice a variable that was unset at the
    # first trace being set later, see _dispatch's docstring: trace afresh.)
    torch._dynamo.reset()
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert torch.equal(torch.compile(marked, backend="eager", fullgraph=True)(x), torch.zeros(3))


def test_unreadable_table_fails_auto_only(monkeypatch):
    monkeypatch.setattr(_dispatch, "_TABLE_ERROR", ConfigError("dispatch.json: broken"))
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match="dispatch.json"):
        _dispatch.choose_path("gumbel_sigmoid", torch.zeros(1))
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.choose_path("gumbel_sigmoid", torch.zeros(1)) == "torch"
