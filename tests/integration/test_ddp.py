"""Two-process torchrun (gloo) runs: parameters stay identical across ranks, and the CLI works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _torchrun(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_parameters_identical_across_ranks(tmp_path, mode):
    # eager: DDP wrappers; compile: G compiled inside DDP, D's compiled step with bucketed all-reduce.
    worker = [str(REPO / "tests" / "helpers" / "ddp_worker.py"), str(tmp_path / "run"), str(tmp_path / "data"), mode]
    proc = _torchrun(worker, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "ddp_result.json").read_text())
    # The ranks trained on different images ...
    a, b = result["first_batch_indices"]
    assert not set(a) & set(b)
    # ... and the parameters moved, yet stayed bit-for-bit in step: gradients were averaged.
    assert result["change_from_init"] > 1e-4
    assert result["max_abs_diff"] == 0.0
    assert result["f_ext_max_abs_diff"] == 0.0


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_gradient_allreduce_overlaps_backward(tmp_path, mode):
    """G's bucket all-reduces start before its backward reaches the input: DDP's overlap, kept
    under torch.compile (G compiled as a module inside DDP, so DDPOptimizer splits its graph at
    the buckets; one compiled backward graph would launch them all after its end)."""
    worker = [str(REPO / "tests" / "helpers" / "ddp_overlap_worker.py"), str(tmp_path / "run"), str(tmp_path / "data"), mode]
    proc = _torchrun(worker, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads((tmp_path / "run" / "overlap.json").read_text())[-1]
    assert last["total"] >= 3, last  # several buckets (1 MB buckets of a 4.7 MB G)
    if mode == "eager":
        assert last["pieces"] == 0 and last["before"] >= 1, last  # all-reduces launched while backward ran
    else:
        # The compiled backward runs in pieces, one per bucket: each bucket's all-reduce can start
        # before the earlier layers' backward (one piece would hand out every gradient at the end).
        assert last["pieces"] >= 3, last


def test_torchrun_cli_writes_metrics(tmp_path):
    proc = _torchrun(
        ["-m", "fastmlgan.train", "--preset", "smoke", "--out", str(tmp_path / "run"), "--data.root", str(tmp_path / "data")],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    keys = {"C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1", "mAP", "avg_labels", "top3"}
    for row in ("baseline", "gan"):
        assert keys <= set(metrics[row])
        # Evaluation shards cover every image exactly once across the two ranks.
        assert metrics[row]["num_images"] == 128
    assert proc.stdout.count("+ WGAN-gp") == 1  # rank 0 alone prints the table
