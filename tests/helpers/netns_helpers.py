"""Two test "hosts" on one machine: network namespaces joined by a veth pair, each with its own
address (issue 22, item 1), and bounded processes in them.

Every namespace and link made here carries the owner's pid in its name (``fmg<pid>a``), so that a
later session removes what a killed one left behind (its pid is gone) and two sessions at once
never share a name. Deleting a namespace deletes the veth end inside it and its peer; the processes
still running in it are killed first (``ip netns pids``): torchrun starts its workers in their own
sessions, so a process group alone would not reach them."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "fmg"
SUBNET = "10.77.0"
_NAME = re.compile(rf"^{PREFIX}(\d+)([ab])$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (a skip reason), or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    probe = f"{PREFIX}{os.getpid()}p"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed (no CAP_NET_ADMIN?): {made.stderr.strip()}"
    try:
        link = _ip("link", "add", f"{probe}0", "type", "veth", "peer", "name", f"{probe}1", check=False)
        if link.returncode != 0:
            return f"`ip link add ... type veth` failed: {link.stderr.strip()}"
        _ip("link", "del", f"{probe}0", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process running in ``ns`` (torchrun agents, their workers)."""
    for _ in range(20):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def delete_namespace(ns: str) -> None:
    kill_namespace_processes(ns)
    _ip("netns", "del", ns, check=False)


def remove_stale() -> list[str]:
    """Delete the namespaces (and a veth end left in this namespace) of sessions that are gone."""
    removed = []
    for ns in _namespaces():
        m = _NAME.match(ns)
        if m and not _alive(int(m.group(1))):
            delete_namespace(ns)
            removed.append(ns)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Host:
    ns: str
    addr: str
    ifname: str

    def command(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]


@dataclass
class TwoHosts:
    """Host A (``10.77.0.1``) and host B (``10.77.0.2``), one veth link between them."""

    a: Host
    b: Host
    made: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> TwoHosts:
        pid = os.getpid()
        a = Host(f"{PREFIX}{pid}a", f"{SUBNET}.1", f"{PREFIX}{pid}a")
        b = Host(f"{PREFIX}{pid}b", f"{SUBNET}.2", f"{PREFIX}{pid}b")
        hosts = cls(a, b)
        try:
            for host in (a, b):
                delete_namespace(host.ns)  # one of this session's earlier tests, cut short
                _ip("netns", "add", host.ns)
                hosts.made.append(host.ns)
            # Both ends are made here and moved at once: a failure in between leaves a link whose
            # name the stale sweep knows.
            _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
            for host in (a, b):
                _ip("link", "set", host.ifname, "netns", host.ns)
                _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
                _ip("-n", host.ns, "link", "set", "lo", "up")
                _ip("-n", host.ns, "link", "set", host.ifname, "up")
        except BaseException:
            hosts.destroy()
            raise
        return hosts

    def destroy(self) -> None:
        for ns in self.made:
            kill_namespace_processes(ns)
        for ns in self.made:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.a.ifname, check=False)  # only there if it was never moved
        self.made.clear()

    def kill_all(self) -> None:
        for ns in self.made:
            kill_namespace_processes(ns)


# ----------------------------------------------------------------------------------------------
# bounded processes


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers are in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            kids = []
        out.extend(kids)
        todo.extend(kids)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and every process below it."""
    pids = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``cmd`` in a session of its own, stdout and stderr into ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int | None]:
    """Wait for every process until ``deadline`` (time.monotonic()); the codes, None where it
    was still running: those are killed (with everything below them)."""
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    codes = [p.poll() for p in procs]
    for p, code in zip(procs, codes):
        if code is None:
            kill_tree(p)
            p.wait(timeout=30)
    return codes


def run_bounded(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> int | None:
    """Run ``cmd`` to its end or ``timeout`` seconds (then killed: None)."""
    return wait_all([start(cmd, env, log)], time.monotonic() + timeout)[0]
