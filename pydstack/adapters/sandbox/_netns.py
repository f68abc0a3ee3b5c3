"""Network namespaces of sandbox CVMs: create, enter, list and kill what runs inside."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000


class NetnsError(OSError):
    pass


def path_of(name: str) -> Path:
    return NETNS_DIR / name


def ensure(name: str) -> None:
    """Create the namespace with loopback up (idempotent)."""
    if not path_of(name).exists():
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if r.returncode and not path_of(name).exists():
            raise NetnsError(f"ip netns add {name}: {r.stderr.strip()}")
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], capture_output=True, check=False)


def delete(name: str) -> None:
    if path_of(name).exists():
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def enter(name: str) -> None:
    """Move the calling thread (call it before any other thread exists) into the namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path_of(name), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise NetnsError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def _inode(name: str) -> int | None:
    try:
        return path_of(name).stat().st_ino
    except FileNotFoundError:
        return None


def pids(name: str) -> list[int]:
    """Every process whose network namespace is ``name``."""
    ino = _inode(name)
    if ino is None:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(d / "ns" / "net").st_ino == ino:
                    out.append(int(d.name))
    return out


def kill_all(name: str, *, exclude: int = 0, timeout_s: float = 5.0) -> int:
    """SIGKILL everything in the namespace (but ``exclude``) and wait until it is gone."""
    deadline = time.monotonic() + timeout_s
    killed = 0
    while True:
        left = [p for p in pids(name) if p != exclude]
        if not left:
            return killed
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
                killed += 1
        if time.monotonic() > deadline:
            return killed
        time.sleep(0.02)


def unmount_under(*roots: Path) -> None:
    """Lazily unmount whatever a dead docker engine left mounted below ``roots``."""
    prefixes = tuple(str(r.resolve()) for r in roots)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefixes)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)
