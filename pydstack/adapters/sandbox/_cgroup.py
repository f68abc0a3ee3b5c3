"""A sandbox CVM's vCPUs and RAM, enforced with the host's cgroup v1 hierarchies.

A VM's processes share its vCPUs and its RAM, so the limits belong to the CVM, not to each
container: one cgroup ``/pds-<id>`` (the name of the CVM's network namespace) per hierarchy.

- ``cpu``: CFS quota ``vcpu`` x period (a 1-vCPU CVM gets one core's time per period however
  many processes it runs) and ``cpu.shares`` 1024 x ``vcpu`` (under contention CVMs share the
  host in proportion to their vCPUs). The guest process, its dockerd (and containerd) and every
  container run under it: the "VM's kernel" side spends the VM's vCPUs too.
- ``memory``: ``memory_mb`` for the app's containers together (no swap beyond it); the CVM's
  dockerd puts every container below ``/pds-<id>`` (``--cgroup-parent``). The guest process and
  dockerd are not charged: they stand in for a guest agent and kernel that take far less in
  dstack's VM than this Python process and a host dockerd do, and charging them would leave a
  256 MB CVM almost nothing for its app.
- ``cpuacct``: the CVM's CPU time (`usage_ns`), as a VMM reads a VM's.

`remove` takes the cgroup away in every hierarchy, with what dockerd left below it (a killed
engine leaves its containers' cgroups). `kill_all` ends every process below it: containers
on a bridge network live in network namespaces of their own, which the CVM's namespace does
not contain, so the cgroup is what finds them::

    ensure("pds-0123456789", vcpu=1, memory_mb=256)   # the VMM, before the CVM starts
    enter("pds-0123456789")                           # the CVM's first process, before children
    kill_all("pds-0123456789")                        # whatever the CVM left running
    remove("pds-0123456789")                          # once nothing runs in it
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
JOINED = ("cpu", "cpuacct")  # the hierarchies the guest process (and its dockerd) join


class CgroupError(OSError):
    pass


def _dir(hierarchy: str, name: str) -> Path:
    return ROOT / hierarchy / name


def _write(path: Path, value: str | int) -> None:
    path.write_text(f"{value}\n")


def _need(hierarchy: str) -> Path:
    base = ROOT / hierarchy
    if not (base / "cgroup.procs").exists() or (base / "cgroup.controllers").exists():
        raise CgroupError(
            f"no cgroup v1 {hierarchy} hierarchy at {base}: sandbox CVMs need the cpu, cpuacct "
            "and memory controllers mounted as cgroup v1 (this host cannot enforce their limits)"
        )
    return base


def ensure(name: str, *, vcpu: int, memory_mb: int) -> None:
    """Create the CVM's cgroup in each hierarchy it is limited in and set its limits
    (idempotent; a changed spec changes them)."""
    if vcpu < 1 or memory_mb < 1:
        raise CgroupError(f"a CVM needs at least 1 vCPU and 1 MB (asked {vcpu}, {memory_mb} MB)")
    for h in ("cpu", "cpuacct", "memory"):
        _need(h)
        _dir(h, name).mkdir(exist_ok=True)
    cpu = _dir("cpu", name)
    _write(cpu / "cpu.cfs_period_us", PERIOD_US)
    _write(cpu / "cpu.cfs_quota_us", vcpu * PERIOD_US)
    _write(cpu / "cpu.shares", 1024 * vcpu)
    mem = _dir("memory", name)
    limit = memory_mb << 20
    files = [mem / "memory.limit_in_bytes"]
    if (mem / "memory.memsw.limit_in_bytes").exists():  # swap accounting on: no swap either
        files.append(mem / "memory.memsw.limit_in_bytes")
    try:  # memsw >= limit at every step: lowering starts with the limit, raising with memsw
        for f in files:
            _write(f, limit)
    except OSError:
        for f in reversed(files):
            _write(f, limit)


def enter(name: str, pid: int = 0) -> None:
    """Move process ``pid`` (0: the caller, all its threads) into the CVM's cpu cgroups; its
    children are born there."""
    for h in JOINED:
        try:
            _write(_dir(h, name) / "cgroup.procs", pid or os.getpid())
        except OSError as e:
            raise CgroupError(f"cannot join cgroup {h}:/{name}: {e}") from None


def exists(name: str) -> bool:
    return any(_dir(h.name, name).is_dir() for h in _hierarchies())


def usage_ns(name: str) -> int:
    """CPU time the CVM's processes used, in ns (cpuacct)."""
    return int((_dir("cpuacct", name) / "cpuacct.usage").read_text())


def limits(name: str) -> tuple[float, int]:
    """(vCPUs' worth of CPU quota, memory limit in bytes) as the kernel has them."""
    cpu = _dir("cpu", name)
    quota = int((cpu / "cpu.cfs_quota_us").read_text())
    period = int((cpu / "cpu.cfs_period_us").read_text())
    mem = int((_dir("memory", name) / "memory.limit_in_bytes").read_text())
    return quota / period, mem


def _hierarchies() -> list[Path]:
    with contextlib.suppress(OSError):
        return [p for p in ROOT.iterdir() if p.is_dir()]
    return []


def remove(name: str) -> list[str]:
    """Remove the CVM's cgroup and everything below it in every hierarchy (v1 and the unified
    one), deepest first; returns the ones still there (a process still in them)."""
    left = []
    for h in _hierarchies():
        top = h / name
        if not top.is_dir():
            continue
        for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
    return left


def pids(name: str) -> set[int]:
    """Every process in the CVM's cgroups (below ``/<name>`` in any hierarchy)."""
    out: set[int] = set()
    for h in _hierarchies():
        for d, _, files in os.walk(h / name):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError, ValueError):
                    out |= {int(x) for x in Path(d, "cgroup.procs").read_text().split()}
    return out


def kill_all(name: str, *, exclude: int = 0, timeout_s: float = 5.0) -> int:
    """SIGKILL every process in the CVM's cgroups (but ``exclude``) until none is left."""
    deadline, killed = time.monotonic() + timeout_s, 0
    while (left := pids(name) - {exclude}) and time.monotonic() < deadline:
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
                killed += 1
        time.sleep(0.02)
    return killed
