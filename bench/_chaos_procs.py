"""The processes bench.chaos kills and restarts, found the way an operator would (by data dir,
network namespace and command line), and what is left of them afterwards.

    proc_pids(lambda argv: "pydstack.actors.supervisor" in argv and str(home) in argv)
    netns_pids("pgab12ha")                          # what runs in a host's namespace
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydstack.adapters.sandbox import _cgroup, _netns
from tests.cli.harness import PYDSTACK


def proc_pids(match: Callable[[str], bool]) -> list[int]:
    """Pids whose command line (NULs as spaces) `match`es; never this process."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if argv and match(argv):
                out.append(int(d.name))
    return sorted(out)


def netns_pids(name: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def kill9(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


class HostProc:
    """`pydstack up` of one "machine" in its namespace, restartable on its data dir as
    systemd would restart it (each run's output in its own log file)."""

    def __init__(self, name: str, netns: str, home: Path, args: list[str]) -> None:
        self.name, self.netns, self.home, self.args = name, netns, home, args
        self.runs = 0
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def start(self) -> None:
        self.runs += 1
        self.logs.append(self.home.parent / f"{self.name}.{self.runs}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
        with self.log.open("wb") as f:
            # nsenter switches the network namespace only (tests/multihost says why)
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{self.netns}", PYDSTACK, "up",
                 "--data-dir", str(self.home), "--log-json", "--metrics-port", "-1",
                 "--dashboard-port", "-1", "--reconcile-interval", "1", *self.args],
                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        return "control plane ready" in self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive() or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2500:]
                raise SystemExit(f"{self.name}'s up did not get ready:\n{tail}")
            time.sleep(0.2)
        return self.state()

    def state(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            state: dict[str, Any] = json.loads((self.home / "state.json").read_text())
            return state
        return {}

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill9(self.proc.pid)  # nsenter execs: this is up itself
            self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def supervisors(self) -> list[int]:
        return proc_pids(lambda a: "pydstack.actors.supervisor" in a and str(self.home) in a)

    def cvms(self) -> dict[str, int]:
        """Running sandbox CVMs (the guest process) by VM id."""
        vms = self.home / "vmm" / "vms"
        out = {}
        for pid in proc_pids(lambda a: "pydstack.adapters.sandbox.guest" in a and str(vms) in a):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                out[Path(argv[-1].decode() or argv[-2].decode()).name] = pid
        return out

    def carriers(self) -> list[int]:
        """The gateway node's wireguard-go (in the host's namespace)."""
        return [p for p in netns_pids(self.netns) if comm(p) == "wireguard-go"]

    def sandboxes(self) -> list[dict[str, str]]:
        out = []
        for f in (self.home / "vmm" / "vms").glob("*/sandbox.json"):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(f.read_text()))
        return out


def cleanup(root: Path, hosts: list[HostProc], namespaces: list[str]) -> None:
    """What the hosts leave once stopped or killed: the CVMs' namespaces, cgroups (their
    containers) and engines, supervisors, wireguard-go, mounts."""
    boxes = [sb for h in hosts for sb in h.sandboxes()]
    for sb in boxes:
        _netns.kill_all(sb["netns"])
        _cgroup.kill_all(sb["netns"])
    for name in namespaces:
        _netns.kill_all(name)
    for pid in proc_pids(lambda a: str(root) in a):
        kill9(pid)
    time.sleep(0.3)
    for sb in boxes:
        _netns.unmount_under(root, Path(sb["run_dir"]))
        _netns.delete(sb["netns"])
        shutil.rmtree(sb["run_dir"], ignore_errors=True)
    _netns.unmount_under(root)


def leftovers(root: Path, hosts: list[HostProc]) -> list[str]:
    """Processes and namespaces of this run still there (after `cleanup`: leaks)."""
    left = [f"pid {p}: {comm(p)}" for p in proc_pids(lambda a: str(root) in a)]
    for sb in (sb for h in hosts for sb in h.sandboxes()):
        left += [f"pid {p} in {sb['netns']}: {comm(p)}" for p in _cgroup.pids(sb["netns"])]
        if _netns.path_of(sb["netns"]).exists():
            left.append(f"netns {sb['netns']}")
    return left
