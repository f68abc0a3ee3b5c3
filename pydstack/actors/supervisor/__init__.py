"""The supervisor: a separate process that runs the host's long-lived processes (QEMU,
wireguard-go, helpers), so they survive a VMM restart and are adopted by a restarted
supervisor. Server: ``python -m pydstack.actors.supervisor``; its client and wire model are the
adapter ``pydstack.adapters.supervisor`` (re-exported here for callers of the whole service).
"""

from pydstack.adapters.supervisor import (
    Conflict,
    NotFound,
    ProcessConfig,
    ProcessInfo,
    ProcessState,
    Status,
    SupervisorClient,
    SupervisorError,
    Unreachable,
    launch_supervisor,
)  # fmt: skip

from ._core import Supervisor, SupervisorSettings

__all__ = [
    "Conflict", "NotFound", "ProcessConfig", "ProcessInfo", "ProcessState", "Status",
    "Supervisor", "SupervisorClient", "SupervisorError", "SupervisorSettings", "Unreachable",
    "launch_supervisor",
]  # fmt: skip
