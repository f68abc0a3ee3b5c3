"""What the supervisor knows about a process, as it travels over its API and sits on disk.

Shapes follow dstack's supervisor (``ProcessConfig`` / ``ProcessInfo``) with what adoption
after a restart needs added: the start time and command line of the pid we launched.
"""

from __future__ import annotations

import re
from typing import Final, Literal

import msgspec

Status = Literal["running", "stopped", "exited", "error"]

# Ids become directory names under the state dir: no slashes, no leading dot.
ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class RunAs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The unprivileged identity a process runs under: exactly these ids, no other groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups (e.g. kvm); root's are never kept


# omit_defaults: a config without ``user`` encodes as before this field existed, so a
# supervisor still running older code accepts it; one with ``user`` it refuses (fails closed).
class ProcessConfig(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """How to run one process. Empty ``stdout``/``stderr`` mean a log file in its state dir;
    ``user`` None: the supervisor's own user (root)."""

    id: str
    command: str
    args: tuple[str, ...] = ()
    name: str = ""
    env: dict[str, str] = {}
    cwd: str = ""
    stdout: str = ""
    stderr: str = ""
    pidfile: str = ""  # an extra plain pid file for other tools (dstack's ``pidfile``)
    cid: int | None = None  # vsock guest CID this process holds (never two at once)
    logs: tuple[str, ...] = ()  # more files it appends to (QEMU's serial log), rotated too
    note: str = ""  # opaque to the supervisor (the VMM keeps its annotation here)
    stop_timeout_s: float = 10.0  # SIGTERM grace before SIGKILL
    log_max_bytes: int = 0  # 0: the supervisor's default
    log_backups: int = -1  # -1: the supervisor's default
    user: RunAs | None = None  # run as this uid/gid (QEMU: its own unprivileged user)

    @property
    def argv(self) -> tuple[str, ...]:
        return (self.command, *self.args)


class ProcessState(msgspec.Struct, kw_only=True):
    """Observed state. ``start_ticks`` and ``cmdline`` identify the pid across restarts."""

    status: Status = "stopped"
    pid: int | None = None
    start_ticks: int | None = None  # field 22 of /proc/<pid>/stat at launch
    cmdline: tuple[str, ...] = ()  # /proc/<pid>/cmdline at launch
    started_at_ns: int | None = None
    stopped_at_ns: int | None = None
    exit_code: int | None = None  # negative: killed by that signal; None: unknown
    reason: str = ""  # why it is not running, in words
    adopted: bool = False  # started by an earlier supervisor instance
    starts: int = 0


class ProcessInfo(msgspec.Struct, frozen=True, kw_only=True):
    config: ProcessConfig
    state: ProcessState
    stdout_path: str
    stderr_path: str

    @property
    def running(self) -> bool:
        return self.state.status == "running"


class StopRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``timeout_s`` None: the process's own ``stop_timeout_s``; 0: SIGKILL at once."""

    timeout_s: float | None = None


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """Every API answer: ``data`` on success, ``error`` (one line) on failure."""

    data: msgspec.Raw = msgspec.Raw(b"null")
    error: str = ""
