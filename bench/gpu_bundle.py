"""The step runner and the result bundle of ``bench/gpu_check.sh``, and the checker CI runs on it.

    python bench/gpu_bundle.py begin --work W --budget 480 --steps "dali env train-b256 ..."
    python bench/gpu_bundle.py step  --work W --name NAME --budget S [--min S] [--outputs a.json,b.xml] -- CMD ...
    python bench/gpu_bundle.py pack  --work W --out OUT
    python bench/gpu_bundle.py check OUT [--require-passed]

Why a bundle: the GPU machine returns at most 8 files from ``$OUT``, chosen by nobody, so the
check writes its logs and results into a work folder outside ``$OUT`` and keeps exactly one file in
``$OUT``: ``gpu-check.tar.gz``, re-packed after every step (written beside and renamed, so a call
cut off mid-step still returns everything up to the last finished step).

The runner's time rule: the whole check has ``--budget`` seconds from ``begin``. A step may run
for its own budget plus what earlier steps left unused, never past the end of the whole; a step
whose ``--min`` (the time it needs for its first result) no longer fits is skipped, not started.
A step that outruns its limit is stopped and recorded with exit 124, as ``timeout`` reports it:
its process group gets SIGINT first (pytest then still writes its junit XML, a bench its JSON),
SIGKILL 10 s later. The step's command sees its limit in ``GPU_CHECK_STEP_LIMIT_S`` (bench/train.py
plans its configurations within it). Only the standard library is imported: the
runner must work when torch itself is what is broken.

``summary.json`` (in the archive) holds the plan, and for each step: status (passed, failed,
timeout, skipped), exit code, seconds, budget and limit, and which declared outputs exist.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ARCHIVE = "gpu-check.tar.gz"
STATE = "steps.json"
KILL_GRACE_S = 10


def _state(work: Path) -> dict:
    path = work / STATE
    if not path.is_file():
        raise SystemExit(f"gpu_bundle: {path} is missing: run 'begin' first")
    return json.loads(path.read_text())


def _save(work: Path, state: dict) -> None:
    tmp = work / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, work / STATE)


def begin(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split()
    state = {"plan": steps, "budget_s": args.budget, "start": time.time(), "device": args.device,
             "revision": args.revision, "steps": []}
    _save(work, state)
    print(f"gpu_check: {len(steps)} steps, {args.budget:.0f} s in all: {' '.join(steps)}", flush=True)
    return 0


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def step(args) -> int:
    work = Path(args.work)
    state = _state(work)
    if args.name not in state["plan"]:
        raise SystemExit(f"gpu_bundle: step {args.name!r} is not in the plan {state['plan']}")
    now = time.time()
    left = state["budget_s"] - (now - state["start"])
    spent_budget = sum(s["budget_s"] for s in state["steps"])
    spent = sum(s["seconds"] for s in state["steps"])
    bank = max(0.0, spent_budget - spent)  # what earlier steps left unused
    limit = max(0.0, min(args.budget + bank, left - KILL_GRACE_S))
    record = {"name": args.name, "budget_s": args.budget, "min_s": args.min, "limit_s": round(limit, 1),
              "command": args.command, "outputs": {}}
    log = work / f"{args.name}.log"
    selected = os.environ.get("GPU_CHECK_STEPS", "").split()
    if selected and args.name not in selected:
        reason = f"not selected (GPU_CHECK_STEPS={' '.join(selected)})"
    elif limit < args.min:
        reason = f"{left:.0f} s left of the check's {state['budget_s']:.0f} s, the step needs at least {args.min:.0f} s"
    else:
        reason = ""
    print(f"=== step {args.name} (budget {args.budget:.0f} s, limit {limit:.0f} s) ===", flush=True)
    if reason:
        log.write_text(f"skipped: {reason}\n")
        record.update(status="skipped", exit=None, seconds=0.0, reason=reason)
    else:
        command = args.command
        if os.environ.get("GPU_CHECK_PLANT_FAIL") == args.name:
            # CI's proof that a failing step shows up as that step's status (tests/integration/test_gpu_check.py).
            command = ["sh", "-c", "echo 'planted failure (GPU_CHECK_PLANT_FAIL)'; exit 3"]
        t0 = time.time()
        env = {**os.environ, "GPU_CHECK_STEP_LIMIT_S": f"{limit:.0f}"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                code = 124
                out.write(f"\ngpu_check: stopped at the step's limit of {limit:.0f} s\n".encode())
        seconds = time.time() - t0
        status = "passed" if code == 0 else ("timeout" if code == 124 else "failed")
        record.update(status=status, exit=code, seconds=round(seconds, 1))
        print(_tail(log), flush=True)
    for name in filter(None, (args.outputs or "").split(",")):
        record["outputs"][name] = (work / name).is_file()
    state["steps"].append(record)
    _save(work, state)
    print(f"=== step {args.name}: {record['status']}"
          + (f", exit {record['exit']} after {record['seconds']:.0f} s" if record["exit"] is not None else f" ({reason})")
          + " ===", flush=True)
    if args.out:
        pack_work(work, Path(args.out))
    return 0


def summary(state: dict) -> dict:
    by_name = {s["name"]: s for s in state["steps"]}
    steps = [by_name.get(name, {"name": name, "status": "not run", "exit": None, "seconds": 0.0})
             for name in state["plan"]]
    return {
        "device": state.get("device"),
        "revision": state.get("revision"),
        "budget_s": state["budget_s"],
        "elapsed_s": round(time.time() - state["start"], 1),
        "failed": sum(s["status"] in ("failed", "timeout") for s in steps),
        "skipped": sum(s["status"] in ("skipped", "not run") for s in steps),
        "steps": steps,
    }


def pack_work(work: Path, out: Path) -> Path:
    """summary.json and every file of ``work`` (flat, no folders) into ``out/gpu-check.tar.gz``."""
    state = _state(work)
    (work / "summary.json").write_text(json.dumps(summary(state), indent=1) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.is_file() and path.name not in (STATE, STATE + ".tmp"):
                tar.add(path, arcname=path.name)
    tmp = out / f".{ARCHIVE}.tmp"
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out / ARCHIVE)
    return out / ARCHIVE


def pack(args) -> int:
    path = pack_work(Path(args.work), Path(args.out))
    result = summary(_state(Path(args.work)))
    print(f"gpu_check: {result['failed']} step(s) failed, {result['skipped']} skipped, {result['elapsed_s']:.0f} s "
          f"in all; bundle {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


def check_bundle(out: Path, require_passed: bool = False) -> list[str]:
    """Problems with the bundle in ``out`` (empty: it is sound)."""
    files = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []
    if [p.name for p in files] != [ARCHIVE]:
        return [f"{out}: expected exactly one file, {ARCHIVE}; found {sorted(str(p.relative_to(out)) for p in files)}"]
    try:
        with tarfile.open(out / ARCHIVE, "r:gz") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as e:
        return [f"{out / ARCHIVE}: not a readable tar.gz archive ({e})"]
    if "summary.json" not in members:
        return [f"{out / ARCHIVE}: no summary.json"]
    try:
        result = json.loads(members["summary.json"])
    except ValueError as e:
        return [f"{out / ARCHIVE}: summary.json is not JSON ({e})"]
    problems = []
    for s in result["steps"]:
        name, status = s["name"], s["status"]
        if status == "not run":
            problems.append(f"step {name}: never reached (the check was cut off before it)")
            continue
        if f"{name}.log" not in members:
            problems.append(f"step {name}: its log {name}.log is missing from the archive")
        if status in ("failed", "timeout"):
            problems.append(f"step {name}: {status}, exit {s['exit']} after {s['seconds']:.0f} s (see {name}.log)")
        elif status == "skipped" and require_passed:
            problems.append(f"step {name}: skipped ({s.get('reason', '')})")
        for output in s.get("outputs", {}):
            if output not in members:
                if status == "passed":
                    problems.append(f"step {name}: passed but its output {output} is missing from the archive")
                continue
            if output.endswith(".json"):
                try:
                    json.loads(members[output])
                except ValueError as e:
                    problems.append(f"step {name}: {output} is not JSON ({e})")
    return problems


def check(args) -> int:
    out = Path(args.out)
    problems = check_bundle(out, args.require_passed)
    archive = out / ARCHIVE
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                result = json.loads(tar.extractfile("summary.json").read())
            print(f"{'step':<14}{'status':<9}{'exit':>5}{'seconds':>9}{'limit':>7}")
            for s in result["steps"]:
                exit_code = "-" if s.get("exit") is None else s["exit"]
                print(f"{s['name']:<14}{s['status']:<9}{exit_code!s:>5}{s['seconds']:>9.1f}{s.get('limit_s', 0):>7.0f}")
        except (KeyError, ValueError, tarfile.TarError, OSError):
            pass
    for line in problems:
        print(f"gpu_check bundle: {line}", file=sys.stderr)
    print("gpu_check bundle: " + ("sound" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("begin")
    b.add_argument("--work", required=True)
    b.add_argument("--budget", type=float, required=True, help="seconds for the whole check")
    b.add_argument("--steps", required=True, help="the planned steps, in order, space-separated")
    b.add_argument("--device", default="")
    b.add_argument("--revision", default="")
    s = sub.add_parser("step")
    s.add_argument("--work", required=True)
    s.add_argument("--out", default="", help="re-pack the bundle into this folder after the step")
    s.add_argument("--name", required=True)
    s.add_argument("--budget", type=float, required=True)
    s.add_argument("--min", type=float, default=0.0, help="skip the step when less than this is left")
    s.add_argument("--outputs", default="", help="comma-separated files the step writes into the work folder")
    s.add_argument("command", nargs=argparse.REMAINDER)
    k = sub.add_parser("pack")
    k.add_argument("--work", required=True)
    k.add_argument("--out", required=True)
    c = sub.add_parser("check")
    c.add_argument("out", help="the folder holding the bundle (the check's $OUT)")
    c.add_argument("--require-passed", action="store_true", help="a skipped step is a problem too (the CI dry run)")
    args = p.parse_args(argv)
    if args.verb == "step":
        if args.command[:1] == ["--"]:
            args.command = args.command[1:]
        if not args.command:
            p.error("step: the command to run follows --")
        return step(args)
    return {"begin": begin, "pack": pack, "check": check}[args.verb](args)


if __name__ == "__main__":
    raise SystemExit(main())
