"""The command fuzz of issue 18 (``make test-faults``): every command's options and files, each
kind of bad input drawn by hypothesis (derandomized, so CI runs the same cases), run as a new user
runs the command, and counted: one line / handled / traceback / hang / silent / lost / unclear.
It fails on any outcome but the first two, and prints the count table.

Kinds: ``fuzz_catalogue`` (at least the 474 kinds of the issue's report). Runner and outcomes:
``fuzz_harness``. The run takes a few minutes on 2 cores (forked children: no interpreter start-up
per case); ``FUZZ_REPORT=FILE`` also writes every case and its outcome as JSON lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fuzz_catalogue import all_kinds
from fuzz_harness import BAD, run_cases, table
from hypothesis import HealthCheck, given, settings
from PIL import Image

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
MIN_KINDS = 474  # the count of bad-input cases tried by hand


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Real inputs for the cases to damage (built in child processes: the test process stays free
    of torch's thread pools, which forked children would inherit)."""
    ws = tmp_path_factory.mktemp("fuzz-ws")
    smoke = ["-m", "fastmlgan", "train", "--preset", "smoke", "--out", str(ws / "run"), "--data.root", str(ws / "data"),
             "--data.embedded_num_val", "64", "--train.max_steps_per_epoch", "4", "--log.plots", "false"]
    _run(smoke, ws)
    _run(["-m", "fastmlgan", "export", "--checkpoint", str(ws / "run"), "--out", str(ws / "model")], ws)
    weights = bytearray((ws / "model" / "model.safetensors").read_bytes())
    weights[-3] ^= 0x40
    (ws / "flipped.safetensors").write_bytes(bytes(weights))
    images = ws / "images"
    images.mkdir()
    shutil.copy(sorted((ws / "data" / "val2017").iterdir())[0], images / "a.jpg")
    Image.fromarray(np.arange(96, dtype=np.uint16).reshape(8, 12) * 600).save(images / "g16.png")
    Image.fromarray(np.linspace(0, 1, 96, dtype=np.float32).reshape(8, 12), mode="F").save(images / "f.tif")
    Image.fromarray(np.full((8, 12), 3.0, np.float32), mode="F").save(images / "hdr.tif")
    Image.fromarray(np.full((8, 12), 70000, np.int32), mode="I").save(images / "i32.tif")
    rotated = Image.new("RGB", (8, 12), (200, 10, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(images / "exif.png", exif=exif.tobytes())
    (images / "cut.jpg").write_bytes((images / "a.jpg").read_bytes()[:300])
    npy = ws / "npy"
    npy.mkdir()
    rng = np.random.default_rng(0)
    targets = (rng.random((20, 4)) < 0.5).astype(np.int64)
    targets[0] = 1
    np.save(npy / "scores.npy", rng.random((20, 4)))
    np.save(npy / "targets.npy", targets)
    np.save(npy / "object.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    np.savez(npy / "arrays.npz", a=np.zeros(3))
    np.save(npy / "flat.npy", rng.random(20))
    np.save(npy / "nan.npy", np.full((20, 4), np.nan))
    np.save(npy / "big.npy", np.full((20, 4), 7.0))
    np.save(npy / "other.npy", rng.random((19, 4)))
    np.save(npy / "empty.npy", np.zeros((0, 4)))
    np.save(npy / "str.npy", np.array([["a"] * 4] * 20))
    from fastmlgan.data.imagecache.format import PREAMBLE_BYTES

    _run(["-m", "fastmlgan", "cache", "build", "--preset", "smoke", "--data.root", str(ws / "data"),
          "--data.embedded_num_val", "64", "--data.cache_dir", str(ws / "cache-pixel"), "--split", "train"], ws)
    for edit in ("truncate", "header", "pixel"):  # a cache of the smoke data, damaged three ways
        folder = ws / f"cache-{edit}"
        if edit != "pixel":
            shutil.copytree(ws / "cache-pixel", folder)
        (path,) = folder.glob("*.fmlc")
        with open(path, "r+b") as f:
            if edit == "pixel":
                f.seek(PREAMBLE_BYTES + 1234)
                f.write(b"\x01\x02")
            elif edit == "truncate":
                f.truncate(path.stat().st_size - 100)
            else:
                f.seek(path.stat().st_size - 40)
                f.write(b"  ")
        shutil.copy(path, ws / f"cache-{edit}.fmlc")
    return ws


def _draw(kind, pending: list):
    """Hypothesis draws the kind's cases (derandomized: the same ones on every run); they run later, two at a time."""

    @settings(max_examples=kind.examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=kind.strategy)
    def draw(case):
        pending.append((kind, case))

    return draw


def test_every_command_refuses_bad_input_with_one_line(workspace, capsys):
    kinds = all_kinds()
    names = {(k.command, k.name) for k in kinds}
    assert len(names) == len(kinds) >= MIN_KINDS, (len(names), len(kinds))
    pending = []
    only = os.environ.get("FUZZ_ONLY")  # a command name, to rerun one command's kinds while fixing it
    for kind in kinds:
        if not only or kind.command in only.split(","):
            _draw(kind, pending)()
    protected = [workspace / name for name in ("data", "run", "model", "images", "npy", "cache-pixel", "cache-truncate",
                                               "cache-header", "flipped.safetensors")]
    results = run_cases(pending, workspace, protected, lanes=int(os.environ.get("FUZZ_LANES", "2")))
    report = table(results)
    with capsys.disabled():
        print(f"\ncommand fuzz (issue 18): {len(kinds)} kinds of bad input, {len(results)} cases\n{report}")
    if os.environ.get("FUZZ_REPORT"):
        with open(os.environ["FUZZ_REPORT"], "w") as f:
            for r in results:
                f.write(json.dumps({"command": r.kind.command, "kind": r.kind.name, "argv": r.argv, "outcome": r.outcome,
                                    "code": r.code, "stderr": r.stderr[-600:]}) + "\n")
    bad = [r for r in results if r.outcome in BAD]
    detail = "\n".join(f"{r.outcome}: {r.kind.command} [{r.kind.name}] rc={r.code} {r.argv!r}\n    "
                       + "\n    ".join(r.stderr.strip().splitlines()[-4:]) for r in bad[:40])
    assert not bad, f"{len(bad)} bad outcomes:\n{report}\n{detail}"
