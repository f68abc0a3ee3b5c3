"""The supervisor: a separate process that runs the host's long-lived processes (QEMU,
wireguard-go, helpers), so they survive a VMM restart and are adopted by a restarted
supervisor. API: ``SupervisorClient``; server: ``python -m pydstack.actors.supervisor``.
"""

from ._core import Supervisor, SupervisorSettings
from ._model import ProcessConfig, ProcessInfo, ProcessState, Status
from .client import SupervisorClient, launch_supervisor
from .errors import Conflict, NotFound, SupervisorError, Unreachable

__all__ = [
    "Conflict", "NotFound", "ProcessConfig", "ProcessInfo", "ProcessState", "Status",
    "Supervisor", "SupervisorClient", "SupervisorError", "SupervisorSettings", "Unreachable",
    "launch_supervisor",
]  # fmt: skip
