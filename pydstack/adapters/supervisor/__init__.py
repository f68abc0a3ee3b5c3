"""Host-side client of the supervisor process (``pydstack.actors.supervisor``): the wire model,
its errors, ``SupervisorClient`` and ``launch_supervisor``. An adapter, so the CVM backends
(``adapters/qemu``, ``adapters/sandbox``) reach the supervisor without importing any actor."""

from ._model import (
    ID_PATTERN,
    ProcessConfig,
    ProcessInfo,
    ProcessState,
    Reply,
    RunAs,
    Status,
    StopRequest,
)
from .client import SupervisorClient, launch_supervisor
from .errors import Conflict, NotFound, SupervisorError, Unreachable, from_status

__all__ = [
    "ID_PATTERN", "Conflict", "NotFound", "ProcessConfig", "ProcessInfo", "ProcessState", "Reply",
    "RunAs", "Status", "StopRequest", "SupervisorClient", "SupervisorError", "Unreachable",
    "from_status", "launch_supervisor",
]  # fmt: skip
