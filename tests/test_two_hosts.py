"""Two real hosts (issue 22, item 1): two network namespaces joined by a veth pair (10.77.0.1 and
10.77.0.2), one torchrun in each, c10d rendezvous on host A, gloo over the link, the smoke preset.

The namespaces share one host name (resolving to 127.0.0.1) and the file system: the run folder in
the tests' tmp folder is the folder both hosts share. Host B sees it read-only (a mount namespace
of its own), so a run that completes proves that only rank 0, on host A, writes it.

Every process is bounded (a deadline, then SIGKILL of everything in both namespaces), and the
namespaces are deleted when the module ends, failed or not (and by the next session if this one
was killed: netns_helpers.remove_stale)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import netns_helpers as nh
import pytest

from fastmlgan.train import checkpoint as ckpt

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
PORT = 29400
# The smoke preset: 256 training images, batch 16 per rank, so 8 steps an epoch on 2 ranks and 16
# BCE steps; 3 GAN epochs; a checkpoint every 2 steps. A collective that waits longer than 60 s
# fails (the default is 30 minutes).
RUN = ["--preset", "smoke", "--train.gan_epochs", "3", "--checkpoint.every_steps", "2",
       "--checkpoint.every_minutes", "0", "--log.plots", "false", "--dist.timeout_s", "60"]
BCE_STEPS = 16
DEADLINE_S = 420


def _env() -> dict[str, str]:
    # One thread per rank on both launches: torchrun sets OMP_NUM_THREADS=1 only for several
    # ranks on one host, and the thread count changes the floating-point sums.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("GLOO_SOCKET_IFNAME", None)
    return env


@pytest.fixture(scope="module")
def hosts():
    reason = nh.unavailable()
    if reason:
        pytest.skip(f"two hosts need network namespaces: {reason}")
    nh.remove_stale()
    two = nh.TwoHosts.create()
    try:
        yield two
    finally:
        two.destroy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run on one host, two ranks (it also writes the data both hosts read)."""
    root = tmp_path_factory.mktemp("two-hosts")
    data, run = root / "data", root / "one-host"
    cmd = ["nice", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastmlgan.train", *RUN, "--data.root", str(data), "--out", str(run)]
    code = nh.run_bounded(cmd, _env(), root / "one-host.log", DEADLINE_S)
    assert code == 0, (root / "one-host.log").read_text()[-3000:]
    return root, data, (run / "metrics.json").read_bytes()


def _torchrun(hosts: nh.TwoHosts, host: nh.Host, run: Path, data: Path, *extra: str) -> list[str]:
    """torchrun as the README's multi-node section writes it, on ``host``; host B sees ``run``
    read-only."""
    is_host = int(host is hosts.a)
    cmd = ["nice", sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts.a.addr}:{PORT}", "--rdzv-id", run.name,
           "--rdzv_conf", f"is_host={is_host}", "--local_addr", host.addr, *extra,
           "-m", "fastmlgan.train", *RUN, "--data.root", str(data), "--out", str(run)]
    if host is hosts.a:
        return host.command(cmd)
    # The run folder is made by rank 0 before host B's rank reads it; B mounts it read-only once it is there.
    script = ('for i in $(seq 600); do [ -d "$1" ] && break; sleep 0.1; done; '
              'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"')
    return host.command(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(run), *cmd])


def _start_both(hosts, run: Path, data: Path, *extra: str) -> list:
    run.parent.mkdir(parents=True, exist_ok=True)
    run.mkdir()  # B's read-only view needs the folder before its torchrun starts
    return [nh.start(_torchrun(hosts, h, run, data, *extra), _env(), run.parent / f"{run.name}-{tag}.log")
            for h, tag in ((hosts.a, "a"), (hosts.b, "b"))]


def _logs(run: Path) -> str:
    return "\n".join(f"--- host {tag}\n" + (run.parent / f"{run.name}-{tag}.log").read_text()[-3000:] for tag in "ab")


def _finish(hosts, procs, run: Path) -> list[int | None]:
    codes = nh.wait_all(procs, time.monotonic() + DEADLINE_S)
    hosts.kill_all()  # workers left behind by a failed agent
    return codes


def test_two_hosts_equal_one_host_byte_for_byte(hosts, reference):
    root, data, want = reference
    run = root / "two-hosts"
    codes = _finish(hosts, _start_both(hosts, run, data), run)
    assert codes == [0, 0], _logs(run)
    record = json.loads((run / "config.json").read_text())["run"]
    assert (record["world_size"], record["num_nodes"]) == (2, 2)
    assert (run / "metrics.json").read_bytes() == want
    # Written once, by rank 0: host B could not have written (read-only), and the files are complete.
    assert ckpt.step_files(run / ckpt.CHECKPOINT_DIR)
    ckpt.verify(run / ckpt.CHECKPOINT_DIR / ckpt.LAST)


def _worker_of(agent_pid: int) -> int | None:
    for pid in nh.descendants(agent_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fastmlgan.train" in cmdline and b"torch.distributed.run" not in cmdline:
            return pid
    return None


def test_host_b_worker_killed_in_phase_2_restarts_on_both_hosts(hosts, reference):
    root, data, want = reference
    run = root / "restarted"
    procs = _start_both(hosts, run, data, "--max-restarts", "2")
    deadline = time.monotonic() + DEADLINE_S
    folder = run / ckpt.CHECKPOINT_DIR
    killed_after = None
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        steps = [step for step, _ in ckpt.step_files(folder)] if folder.is_dir() else []
        if (folder / ckpt.BASELINE).is_file() and steps and max(steps) > BCE_STEPS:
            worker = _worker_of(procs[1].pid)
            if worker is not None:
                os.kill(worker, signal.SIGKILL)  # host B's rank dies without warning, mid-phase 2
                killed_after = max(steps)
                break
        time.sleep(0.05)
    assert killed_after is not None, "phase 2 never began\n" + _logs(run)
    codes = _finish(hosts, procs, run)
    assert codes == [0, 0], _logs(run)
    log_a = (run.parent / f"{run.name}-a.log").read_text()
    # Host A's agent saw a membership change (its count stays 0); rank 0 still resumed.
    assert "resuming" in log_a and "from its last checkpoint" in log_a, _logs(run)
    assert (run / "metrics.json").read_bytes() == want


def test_a_host_that_never_joins_is_one_line(hosts, tmp_path):
    """Host A alone, through the kit's launcher: one line naming the endpoint and the timeout."""
    endpoint = f"{hosts.a.addr}:{PORT + 1}"
    cmd = hosts.a.command([sys.executable, "-m", "fastmlgan", "train", "--nnodes", "2", "--nproc", "1",
                           "--rdzv-endpoint", endpoint, "--node-addr", hosts.a.addr, "--rdzv-timeout", "5",
                           *RUN, "--data.root", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    log = tmp_path / "alone.log"
    code = nh.run_bounded(cmd, _env(), log, 180)
    hosts.kill_all()
    assert code is not None, "still waiting after 180 s"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, lines
    assert endpoint in lines[0] and "--rdzv-timeout 5 s" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # no worker started
