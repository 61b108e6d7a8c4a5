"""The ``fastmlgan`` command: subcommands, --version, --help, bench and train --nproc (issue 10, item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fastmlgan.commands import cli

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ("train", "evaluate", "predict", "export", "check", "cache", "shards", "embedded", "metrics", "reproduce", "sweep", "bench")


def test_help_lists_every_subcommand_on_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(SUBCOMMANDS)
    assert cli.main([]) == 2  # no command: the usage, as an error
    assert "commands:" in capsys.readouterr().out


def test_version(capsys):
    import torch
    import torchvision

    from fastmlgan import __version__

    assert cli.main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"fastmlgan {__version__}"
    assert lines[1].startswith(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}")
    assert lines[2] == f"torchvision {torchvision.__version__}"
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert lines[-1].startswith(f"git {head}")


def test_unknown_command_suggests(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean train?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate", "check", "reproduce", "predict", "export"])
def test_dispatch_hands_the_arguments_to_the_module(command, monkeypatch):
    # predict and export come from another branch; a stand-in module checks the dispatch.
    module_name = cli.COMMANDS[command][0]
    seen = []
    fake = types.ModuleType(module_name)
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, module_name, fake)
    assert cli.main([command, "--a", "b", "c"]) == 7
    assert seen == [["--a", "b", "c"]]


@pytest.mark.parametrize("command", ["predict", "export"])
def test_missing_command_module_is_a_clear_error(command, monkeypatch, capsys):
    module_name = cli.COMMANDS[command][0]
    monkeypatch.setitem(sys.modules, module_name, None)  # as if the module were not installed
    assert cli.main([command, "x"]) == 2
    assert f"'fastmlgan {command}' is not available in this installation" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "export"])
def test_real_predict_and_export_dispatch(command):
    import importlib.util

    module_name = cli.COMMANDS[command][0]
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} is not on this branch yet (the ship-use helper writes it)")
    done = subprocess.run([sys.executable, "-m", "fastmlgan", command, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr


def test_python_dash_m_fastmlgan(tmp_path):
    # The module entry point, in a fresh interpreter; the old `python -m fastmlgan.train` keeps working.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "fastmlgan", "check"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 2 and "name the dataset to check" in done.stderr
    old = subprocess.run([sys.executable, "-m", "fastmlgan.train", "--gan.gp_wieght", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert old.returncode == 2 and "did you mean --gan.gp_weight" in old.stderr


def test_train_nproc_launches_torchrun(monkeypatch):
    import torch.distributed.run as torchrun

    launched = []
    monkeypatch.setattr(torchrun, "run", launched.append)  # torchrun runs in this process (issue 18)
    assert cli.main(["train", "--preset", "smoke", "--nproc", "4", "--out", "x"]) == 0
    (args,) = launched
    assert args.standalone and args.nproc_per_node == "4" and args.module and args.training_script == "fastmlgan.train"
    assert args.training_script_args == ["--preset", "smoke", "--out", "x"]


def test_train_nproc_one_runs_in_process_and_bad_values(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("fastmlgan.commands.train")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fastmlgan.commands.train", fake)
    monkeypatch.setattr(cli, "launch_torchrun", lambda *a: pytest.fail("no torchrun for one process"))
    assert cli.main(["train", "--nproc=1", "--preset", "smoke"]) == 0 and seen == [["--preset", "smoke"]]
    for bad, message in ((["--nproc"], "--nproc needs"), (["--nproc", "two"], "expected a number"), (["--nproc", "0"], ">= 1")):
        assert cli.main(["train", *bad]) == 2
        assert message in capsys.readouterr().err


def test_bench_runs_a_script_by_name(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "loader.py").write_text("import sys; print('loader', sys.argv[1:]); raise SystemExit(3)\n")
    (bench / "test_bench_x.py").write_text("")  # pytest files are not benchmarks
    (bench / "gpu_check.sh").write_text("echo gpu \"$@\"\n")
    assert sorted(cli.bench_scripts(bench)) == ["gpu_check", "loader"]
    called = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, **kw: called.append((command, kw["cwd"])) or 3)
    assert cli.run_bench(["loader", "--repeats", "2"], bench) == 3
    assert called == [([sys.executable, str(bench / "loader.py"), "--repeats", "2"], tmp_path)]
    assert cli.run_bench(["gpu_check"], bench) == 3 and called[-1][0] == ["bash", str(bench / "gpu_check.sh")]
    assert cli.run_bench(["lodaer"], bench) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'lodaer'" in err and "did you mean loader" in err


def test_bench_really_runs_the_script(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "echo.py").write_text("import sys; print('echo', *sys.argv[1:]); raise SystemExit(3)\n")
    done = subprocess.run([sys.executable, "-c", f"from fastmlgan.commands import cli; from pathlib import Path; "
                           f"raise SystemExit(cli.run_bench(['echo', 'a'], Path({str(bench)!r})))"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 3 and done.stdout == "echo a\n"


def test_bench_without_a_checkout(tmp_path, capsys):
    assert cli.run_bench(["loader"], tmp_path / "absent") == 2
    assert "scripts in a source checkout's bench/ folder" in capsys.readouterr().err


def test_bench_lists_this_repository_benchmarks(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("loader", "kernels", "gpu_check"):
        assert f"  {name} " in out
