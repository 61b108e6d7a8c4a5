"""What bench/gpu_check.sh runs, checked on a CPU: the scripts' GPU-only lines (a missing
``torch.cuda`` attribute, profiler arithmetic, timing and memory order, CUDA-graph evidence,
the time budget), the step runner and its one-archive bundle, the DALI transport, and the
revision that travels without ``.git``. The whole dry run (``make gpu-check-dry``) is CI's job."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import gpu_bundle  # noqa: E402
import loader as bench_loader  # noqa: E402
import scaling  # noqa: E402
import train as bench_train  # noqa: E402

from fastmlgan import environment  # noqa: E402
from fastmlgan.data.types import LabeledImages  # noqa: E402

# ---------------------------------------------------------------------------------------------
# item 1: a torch.cuda attribute that exists in no release killed the loader step before its JSON


def _torch_cuda_attributes(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "torch"):
            names.add(node.attr)
    return names


def test_bench_scripts_call_only_torch_cuda_functions_that_exist():
    missing = {f"{p.name}: torch.cuda.{a}" for p in BENCH.glob("*.py") for a in _torch_cuda_attributes(p)
               if not hasattr(torch.cuda, a)}
    assert not missing


def test_loader_results_record_a_gpus_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    args = SimpleNamespace(batch_size=128, threads=8, image_size=224, repeats=3)
    record = bench_loader.record(torch.device("cuda"), args, "coco128x8", "bench/loader.py", (0, 0, 0), {}, [])
    assert record["device_name"] == "NVIDIA H200"
    json.dumps(record)


# ---------------------------------------------------------------------------------------------
# item 8: epochs long enough to measure throughput, not the pipeline filling up


def test_small_listings_are_repeated_to_the_minimum_epoch():
    images = LabeledImages("x", ["a.jpg", "b.jpg", "c.jpg"], np.eye(3, dtype=np.uint8), ["p", "q", "r"])
    longer = bench_loader.repeat_to(images, 8)
    assert len(longer) == 9 and longer.paths[3:6] == images.paths
    assert np.array_equal(longer.labels[6:], images.labels)
    assert bench_loader.repeat_to(images, 3) is images


# ---------------------------------------------------------------------------------------------
# items 4, 5, 6, 10: bench/train.py


def _event(name, device, us=0.0, annotation=False):
    from torch.autograd import DeviceType

    return SimpleNamespace(name=name, device_type=DeviceType.CUDA if device else DeviceType.CPU,
                           is_user_annotation=annotation, time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_profile_counts_each_kernel_once_and_launches_from_the_host():
    # Two steps: 3 kernels each launched on their own (a CPU op, its launch call, the kernel),
    # plus one replayed graph of 5 kernels (one cudaGraphLaunch), inside an annotation range.
    events = []
    for _ in range(2):
        events.append(_event("## step ##", device=True, us=1000.0, annotation=True))
        for _ in range(3):
            events += [_event("aten::mm", False), _event("cudaLaunchKernel", False), _event("gemm", True, 10.0)]
        events.append(_event("cudaGraphLaunch", False))
        events += [_event("fused_relu", True, 2.0) for _ in range(5)]
    out = bench_train.summarize_profile(events, steps=2)
    assert out["kernels_per_step"] == 8
    assert out["device_ms_per_step"] == pytest.approx((3 * 10 + 5 * 2) / 1e3)
    assert out["host_launches_per_step"] == 4 and out["graph_launches_per_step"] == 1


def test_profile_wall_time_ends_before_the_profilers_teardown(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench_train.time, "perf_counter", lambda: clock[0])

    class SlowTeardown:
        def __enter__(self):
            return SimpleNamespace(events=lambda: [])

        def __exit__(self, *exc):
            clock[0] += 100.0  # seconds of event processing

    def one_second_step(trainer, phase, batch):
        clock[0] += 1.0

    monkeypatch.setattr(bench_train, "step", one_second_step)
    args = SimpleNamespace(device=torch.device("cpu"), profile=4)
    out = bench_train.profile_steps(None, "bce", SimpleNamespace(next=lambda: None), args, profiler=SlowTeardown())
    assert out["wall_ms_per_step"] == 1000.0


def test_synthetic_batches_are_made_on_the_device(monkeypatch):
    calls = []
    real = torch.randn

    def randn(*shape, **kwargs):
        calls.append(kwargs.get("device"))
        return real(*shape, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    device = torch.device("cpu")
    x = bench_train.synthetic_images(2, 8, device, torch.channels_last, seed=0)
    assert calls == [device]
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)


def test_cudagraph_evidence():
    args = SimpleNamespace(device=torch.device("cuda"), compile_backend="inductor")
    assert bench_train.cudagraph_record(args, ["skipping cudagraphs due to mutated inputs"], None)["ran"] is False
    assert bench_train.cudagraph_record(args, [], {"graph_launches_per_step": 6.0})["ran"] is True
    assert bench_train.cudagraph_record(args, [], {"graph_launches_per_step": 0.0})["ran"] is False
    assert bench_train.cudagraph_record(args, [], None)["ran"] is None  # unknown without a profile
    cpu = SimpleNamespace(device=torch.device("cpu"), compile_backend="inductor")
    assert bench_train.cudagraph_record(cpu, [], {"graph_launches_per_step": 0.0})["ran"] is False
    # The skip reasons come from inductor's own reporting function.
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    with bench_train.CudagraphSkips() as skips:
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to a test")
    assert skips.reasons == ["skipping cudagraphs due to a test"]


def test_train_bench_skips_what_cannot_finish_and_reads_memory_before_profiling(tmp_path, monkeypatch):
    order = []
    for name in ("peak_memory", "profile_steps", "count_flops"):
        real = getattr(bench_train, name)
        monkeypatch.setattr(bench_train, name, lambda *a, _real=real, _name=name, **k: (order.append(_name), _real(*a, **k))[1])
    out = tmp_path / "train.json"
    argv = ["--device", "cpu", "--backbone", "smallcnn", "--width", "4", "--image-size", "16", "--batch", "2",
            "--plan", "compile/bce", "eager/bce", "--steps", "1", "--warmup", "1", "--repeats", "1", "--profile", "1",
            "--num-images", "32", "--time-budget", "300", "--compile-estimate", "1000", "--out", str(out)]
    assert bench_train.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["mode"] == "compile" and "needs about 1000 s" in rows[0]["skipped"]
    assert rows[1]["mode"] == "eager" and rows[1]["img_per_s"] > 0
    assert order == ["peak_memory", "profile_steps", "count_flops"]


# ---------------------------------------------------------------------------------------------
# item 11: scaling's clock, the DALI transport, the revision without .git


def test_allreduce_clock_starts_after_a_barrier(monkeypatch):
    log = []
    monkeypatch.setattr(scaling.time, "perf_counter", lambda: log.append("clock") or 0.0)
    dist = SimpleNamespace(barrier=lambda: log.append("barrier"), all_reduce=lambda x: log.append("all_reduce"))
    scaling.time_allreduce(dist, torch.zeros(1), repeats=2, sync=lambda: None, warmup=1)
    for i, entry in enumerate(log):
        if entry == "all_reduce":
            assert log[i - 2 : i] == ["barrier", "clock"]
    assert log.count("barrier") == 3


def test_dali_transport_never_shadows_the_machines_packages(tmp_path):
    site = tmp_path / "site"
    (site / "fastmlgan_probe").mkdir(parents=True)
    (site / "fastmlgan_probe" / "__init__.py").write_text("X = 1\n")
    (site / "packaging").mkdir()  # this Python has packaging (pytest needs it)
    (site / "packaging" / "__init__.py").write_text("raise ImportError('shadowed')\n")
    (site / "packaging-1.0.dist-info").mkdir()
    (site / "packaging-1.0.dist-info" / "METADATA").write_text("Name: packaging\n")
    (site / "nvidia" / "dali").mkdir(parents=True)
    (site / "nvidia" / "dali" / "__init__.py").write_text("")
    parts = tmp_path / "parts"
    run = [sys.executable, str(BENCH / "dali_transport.py")]
    subprocess.run([*run, "pack", "--site", str(site), "--out", str(parts)], check=True, capture_output=True)
    done = subprocess.run([*run, "install", "--src", str(parts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    installed = parts / "site"
    assert sorted(p.name for p in installed.iterdir()) == ["fastmlgan_probe", "nvidia"]
    assert "packaging" in done.stderr and Path(done.stdout.strip()) == installed.resolve()
    # A damaged part is refused by name.
    part = parts / "p0" / "part"
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    done = subprocess.run([*run, "install", "--src", str(parts)], capture_output=True, text=True)
    assert done.returncode == 2 and "sha256" in done.stderr


def test_git_revision_from_the_recorded_file_without_dot_git(tmp_path):
    assert environment.git_revision(tmp_path) is None
    (tmp_path / environment.REVISION_FILE).parent.mkdir()
    (tmp_path / environment.REVISION_FILE).write_text("0123abc-dirty\n")
    assert environment.git_revision(tmp_path) == "0123abc-dirty"


# ---------------------------------------------------------------------------------------------
# item 12: loop bounds the Triton interpreter of every version can take


def test_kernel_loops_run_over_constexpr_counts():
    # Triton 3.6's interpreter passes a runtime scalar as a one-element NumPy array, which range()
    # rejects under NumPy 2.5; a tl.constexpr is a Python int in every Triton.
    source = ast.parse((REPO / "fastmlgan" / "kernels" / "gradient_penalty.py").read_text())
    loops = 0
    for fn in ast.walk(source):
        if not (isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list)):
            continue
        constexprs = {a.arg for a in fn.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)}
        for node in ast.walk(fn):
            if isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and ast.unparse(node.iter.func) == "range":
                loops += 1
                names = {n.id for arg in node.iter.args for n in ast.walk(arg) if isinstance(n, ast.Name)}
                assert names <= constexprs, f"{fn.name}: range over runtime {sorted(names - constexprs)}"
    assert loops == 4


# ---------------------------------------------------------------------------------------------
# items 2 and 3: the step runner and the one-archive bundle


def _bundle(tmp_path: Path, steps: list[tuple[str, float, float, list[str]]], budget: float = 100.0) -> Path:
    work, out = tmp_path / "work", tmp_path / "out"
    gpu_bundle.main(["begin", "--work", str(work), "--budget", str(budget), "--steps", " ".join(s[0] for s in steps)])
    for name, step_budget, minimum, command in steps:
        gpu_bundle.main(["step", "--work", str(work), "--out", str(out), "--name", name, "--budget", str(step_budget),
                         "--min", str(minimum), "--outputs", f"{name}.json", "--", *command])
    gpu_bundle.main(["pack", "--work", str(work), "--out", str(out)])
    return out


def _summary(out: Path) -> dict:
    with tarfile.open(out / gpu_bundle.ARCHIVE) as tar:
        return json.loads(tar.extractfile("summary.json").read())


def test_bundle_records_each_steps_status_in_one_archive(tmp_path, capsys):
    work = tmp_path / "work"
    trap = (f"import signal, sys, time, json\n"
            f"def stop(*a):\n    json.dump({{'partial': True}}, open({str(work / 'slow.json')!r}, 'w')); sys.exit(130)\n"
            f"signal.signal(signal.SIGINT, stop)\ntime.sleep(30)\n")
    out = _bundle(tmp_path, [
        ("slow", 1, 0, [sys.executable, "-c", trap]),  # stopped at its limit: SIGINT, then it writes
        ("good", 20, 0, [sys.executable, "-c", f"open({str(work / 'good.json')!r}, 'w').write('{{}}')"]),
        ("bad", 20, 0, ["sh", "-c", "echo broken; exit 3"]),
        ("late", 20, 1000, ["true"]),  # cannot get its minimum: skipped, never started
    ])
    assert [p.name for p in out.iterdir()] == [gpu_bundle.ARCHIVE]
    steps = {s["name"]: s for s in _summary(out)["steps"]}
    assert (steps["good"]["status"], steps["good"]["exit"]) == ("passed", 0)
    assert (steps["bad"]["status"], steps["bad"]["exit"]) == ("failed", 3)
    assert (steps["slow"]["status"], steps["slow"]["exit"]) == ("timeout", 124)
    assert steps["slow"]["outputs"] == {"slow.json": True}
    assert steps["late"]["status"] == "skipped" and "needs at least 1000 s" in steps["late"]["reason"]
    problems = gpu_bundle.check_bundle(out)
    assert any(p.startswith("step bad: failed, exit 3") for p in problems)
    assert any(p.startswith("step slow: timeout, exit 124") for p in problems)
    assert not any("good" in p or "late" in p for p in problems)
    assert any("late" in p for p in gpu_bundle.check_bundle(out, require_passed=True))
    with tarfile.open(out / gpu_bundle.ARCHIVE) as tar:
        assert {"good.log", "bad.log", "slow.log", "late.log", "good.json", "slow.json"} <= set(tar.getnames())
        assert b"broken" in tar.extractfile("bad.log").read()


def test_checker_refuses_extra_files_and_a_missing_output(tmp_path):
    out = _bundle(tmp_path, [("quiet", 20, 0, ["true"])])  # passed, but wrote no quiet.json
    assert gpu_bundle.check_bundle(out) == ["step quiet: passed but its output quiet.json is missing from the archive"]
    (out / "stray.json").write_text("{}")
    assert "expected exactly one file" in gpu_bundle.check_bundle(out)[0]


def test_the_scripts_planted_failure_shows_as_that_steps_status(tmp_path):
    # The real script on the CPU switch, only its environment step, with a failure planted there.
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(tmp_path / "out"), "GPU_CHECK_STEPS": "env",
           "GPU_CHECK_PLANT_FAIL": "env", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    summary = _summary(tmp_path / "out")
    steps = {s["name"]: s for s in summary["steps"]}
    assert [s["name"] for s in summary["steps"]] == [
        "dali", "env", "train-b256", "train-b32", "loader-bench", "kernel-bench", "gpu-tests"]
    assert (steps["env"]["status"], steps["env"]["exit"]) == ("failed", 3)
    assert all(s["status"] == "skipped" for n, s in steps.items() if n != "env")
    checked = subprocess.run([sys.executable, str(BENCH / "gpu_bundle.py"), "check", str(tmp_path / "out")],
                             capture_output=True, text=True)
    assert checked.returncode == 1 and "step env: failed, exit 3" in checked.stderr


def test_make_gpu_check_dry_checks_the_bundle_the_script_wrote(tmp_path):
    # CI's command: the Makefile must hand the checker the folder the script wrote to (a make
    # variable holding $(shell mktemp -d) made a new folder at each use: the checker then found no
    # bundle and a passing run failed). A failure planted in the env step must come back as that
    # step's status, read from the script's own bundle.
    # No GPU_CHECK_OUT: the default folder (mktemp, here under TMPDIR) is the case that broke.
    env = {**os.environ, "GPU_CHECK_STEPS": "env", "GPU_CHECK_PLANT_FAIL": "env", "TMPDIR": str(tmp_path)}
    env.pop("GPU_CHECK_OUT", None)
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", "-o", ".venv/.install-spec", "gpu-check-dry",
         f"PY={sys.executable}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "step env: failed, exit 3" in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    bundles = list(tmp_path.glob("*/gpu-check.tar.gz"))
    assert len(bundles) == 1 and [p.name for p in bundles[0].parent.iterdir()] == ["gpu-check.tar.gz"]


def test_the_scripts_budget_header_adds_up():
    text = (BENCH / "gpu_check.sh").read_text()
    header = {line.split()[1]: int(line.split()[2]) for line in text.splitlines()
              if line.startswith("#   ") and len(line.split()) > 3 and line.split()[2].isdigit()
              and line.split()[1] in ("dali", "env", "train-b256", "train-b32", "loader-bench", "kernel-bench", "gpu-tests")}
    calls = {}
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["step"] and len(parts) > 3 and parts[2].isdigit():
            calls.setdefault(parts[1], int(parts[2]))
    assert header == calls and sum(calls.values()) <= 480
    assert f"sum            {sum(calls.values())}" in text
