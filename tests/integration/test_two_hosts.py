"""Two real hosts (issue 22, item 1): two network namespaces joined by a veth pair (10.77.0.1 and
10.77.0.2), one torchrun in each, c10d rendezvous on host A, gloo over the link, the smoke preset.

The namespaces share one host name (resolving to 127.0.0.1) and the file system: the run folder in
the tests' tmp folder is the folder both hosts share. Host B sees it through a mount namespace of
its own: read-only (the restart test: it must read the checkpoint), or a separate empty folder in
its place (a folder that is not shared), which must stay empty: only rank 0, on host A, writes.

Every process is bounded (a deadline, then SIGKILL of everything in both namespaces), and the
namespaces are deleted when the module ends, failed or not (and by the next session if this one
was killed: netns_helpers.remove_stale)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import netns_helpers as nh
import pytest

from fastmlgan.train import checkpoint as ckpt

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
PORT = 29400
# The smoke preset: 2 BCE epochs of 12 steps (steps 1-24), then 3 GAN epochs of one step each
# (25-27, each followed by an evaluation); a checkpoint every 2 steps and at every epoch end. A
# collective that waits longer than 60 s fails (the default is 30 minutes).
RUN = ["--preset", "smoke", "--train.gan_epochs", "3", "--checkpoint.every_steps", "2",
       "--checkpoint.every_minutes", "0", "--log.plots", "false", "--dist.timeout_s", "60"]
BCE_STEPS = 24
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


def _torchrun(hosts: nh.TwoHosts, host: nh.Host, run: Path, data: Path, *extra: str, b_view: Path | None) -> list[str]:
    """torchrun as the README's multi-node section writes it, on ``host``. Host B sees ``run``
    read-only (``b_view`` None: the folder is shared) or sees the folder ``b_view`` there instead
    (a folder that is not shared)."""
    is_host = int(host is hosts.a)
    cmd = ["nice", sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts.a.addr}:{PORT}", "--rdzv-id", run.name,
           "--rdzv_conf", f"is_host={is_host}", "--local_addr", host.addr, *extra,
           "-m", "fastmlgan.train", *RUN, "--data.root", str(data), "--out", str(run)]
    if host is hosts.a:
        return host.command(cmd)
    # A mount namespace of host B's own, so that its view of the run folder is its alone.
    if b_view is None:
        script, paths = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift 2 && exec "$@"', [run, run]
    else:
        script, paths = 'mount --bind "$2" "$1" && shift 2 && exec "$@"', [run, b_view]
    return host.command(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *map(str, paths), *cmd])


def _start_both(hosts, run: Path, data: Path, *extra: str, b_view: Path | None = None) -> list:
    run.mkdir(parents=True)  # the mount point of host B's view
    return [nh.start(_torchrun(hosts, h, run, data, *extra, b_view=b_view), _env(), run.parent / f"{run.name}-{tag}.log")
            for h, tag in ((hosts.a, "a"), (hosts.b, "b"))]


def _logs(run: Path) -> str:
    return "\n".join(f"--- host {tag}\n" + (run.parent / f"{run.name}-{tag}.log").read_text()[-3000:] for tag in "ab")


def _finish(hosts, procs, run: Path) -> list[int | None]:
    codes = nh.wait_all(procs, time.monotonic() + DEADLINE_S)
    hosts.kill_all()  # workers left behind by a failed agent
    return codes


def test_two_hosts_equal_one_host_byte_for_byte(hosts, reference):
    """Host B's run folder is a folder of its own (not shared): the run needs nothing from it."""
    root, data, want = reference
    run, b_view = root / "two-hosts", root / "host-b-view"
    b_view.mkdir()
    codes = _finish(hosts, _start_both(hosts, run, data, b_view=b_view), run)
    assert codes == [0, 0], _logs(run)
    record = json.loads((run / "config.json").read_text())["run"]
    assert (record["world_size"], record["num_nodes"]) == (2, 2)
    assert (run / "metrics.json").read_bytes() == want
    # Written once, by rank 0 on host A: host B's folder is still empty.
    assert ckpt.step_files(run / ckpt.CHECKPOINT_DIR)
    ckpt.verify(run / ckpt.CHECKPOINT_DIR / ckpt.LAST)
    assert sorted(p.relative_to(b_view).as_posix() for p in b_view.rglob("*")) == []


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
    # One restart must be enough: a first restart that fails (the run folder refused) and a
    # second that resumes would pass with more.
    procs = _start_both(hosts, run, data, "--max-restarts", "1")
    deadline = time.monotonic() + DEADLINE_S
    folder = run / ckpt.CHECKPOINT_DIR
    killed_after = None
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        steps = [step for step, _ in ckpt.step_files(folder)] if folder.is_dir() else []
        if (folder / ckpt.BASELINE).is_file() and steps and max(steps) > BCE_STEPS:
            worker_a, worker_b = _worker_of(procs[0].pid), _worker_of(procs[1].pid)
            if worker_a is not None and worker_b is not None:
                # Host A's rank is frozen first, so that host A's agent always restarts it for the
                # membership change (B's agent re-joining), which it does not count, and never for
                # its own rank failing on the broken link, which it would count: the case where
                # the hosts' restart counts differ (without it, a race decides). The agent stops
                # the frozen rank with SIGKILL after its 30 s grace.
                os.kill(worker_a, signal.SIGSTOP)
                os.kill(worker_b, signal.SIGKILL)  # host B's rank dies without warning, mid-phase 2
                killed_after = max(steps)
                break
        time.sleep(0.05)
    assert killed_after is not None, "phase 2 never began\n" + _logs(run)
    codes = _finish(hosts, procs, run)
    assert codes == [0, 0], _logs(run)
    log_a = (run.parent / f"{run.name}-a.log").read_text()
    # Host A's agent saw a membership change (its restart count stays 0); rank 0 resumed all the same.
    assert "resuming" in log_a and "from its last checkpoint" in log_a, _logs(run)
    resumed = re.search(r"resumed from \S+: phase (\w+), \d+ epochs done, step (\d+)", log_a)
    # From the newest checkpoint in phase 2 (a later one than seen can have landed before the kill).
    assert resumed and resumed[1] == "gan" and int(resumed[2]) >= killed_after, _logs(run)
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
