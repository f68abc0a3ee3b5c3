"""Reading /proc: is this pid still the process we launched, and which vsock CIDs are in use.

A pid alone is not an identity: after a crash the kernel may give it to another process. The
start time (in clock ticks since boot, field 22 of ``/proc/<pid>/stat``) together with the
command line is, so adoption compares both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_CID = re.compile(rb"guest-cid=(\d+)")


def _stat_fields(pid: int, proc: Path) -> list[str] | None:
    try:
        raw = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    return raw[raw.rindex(")") + 2 :].split()


def start_ticks(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Start time of ``pid`` in clock ticks after boot; None when there is no such process."""
    fields = _stat_fields(pid, proc)
    return int(fields[19]) if fields else None


def is_alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """True when ``pid`` exists and has not exited (a zombie nobody reaped counts as dead)."""
    fields = _stat_fields(pid, proc)
    return fields is not None and fields[0] not in ("Z", "X", "x")


def cmdline(pid: int, proc: Path = Path("/proc")) -> tuple[str, ...] | None:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1])


def is_same_process(
    pid: int, ticks: int | None, argv: tuple[str, ...], proc: Path = Path("/proc")
) -> bool:
    """Whether ``pid`` is still alive and is the very process that had ``ticks`` and ``argv``."""
    if ticks is None or not is_alive(pid, proc):
        return False
    return start_ticks(pid, proc) == ticks and cmdline(pid, proc) == argv


def cids_in_use(exclude_pids: set[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """``{cid: pid}`` of every live process outside ``exclude_pids`` with ``guest-cid=N``.

    Catches QEMUs the supervisor did not launch (dstack #997: a one-shot VM invisible to the
    pool) so a deploy cannot hand out a CID that another VM on this host already holds.
    """
    found: dict[int, int] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) in exclude_pids:
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        for m in _CID.finditer(raw):
            if is_alive(int(entry.name), proc):
                found[int(m.group(1))] = int(entry.name)
    return found
