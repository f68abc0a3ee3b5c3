"""The VMs read model: one ``Vm`` per ``dstack.vm.<vm_id>`` aggregate.

Lifecycle (``Vm.state``)::

    requested ─► scheduled ─► starting ─► running ─► exited | stopped ─► (starting again)
        └──────► rejected                                   any ───────► removed

``starting`` begins with ``VmStarted`` (the CVM process is up) and becomes ``running`` when the
guest reports a boot stage in ``READY_STAGES``. ``removed`` is final. What the operator asked
for is ``desired`` (``running``, ``stopped`` or ``removed``), so an actor compares ``desired``
with ``state`` instead of replaying commands.
"""

from __future__ import annotations

from typing import Final, Literal

from msgspec import Struct
from msgspec.structs import replace

from pydstack.core.events import (
    PortMap,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRejected,
    VmRemoved,
    VmRemoveRequested,
    VmRequested,
    VmResources,
    VmScheduled,
    VmStarted,
    VmStartRequested,
    VmStopped,
    VmStopRequested,
)

from ._applied import Applied

VmState = Literal[
    "requested", "scheduled", "rejected", "starting", "running", "exited", "stopped", "removed"
]
Desired = Literal["running", "stopped", "removed"]

# Boot stages after which the guest's app is up (dstack's guest agent ends with "done").
READY_STAGES: Final = frozenset({"done", "ready", "running"})


class Vm(Struct, frozen=True, kw_only=True):
    vm_id: str
    app_id: str
    name: str
    resources: VmResources
    image: str = ""
    compose_hash: str = ""
    requested_ports: tuple[PortMap, ...] = ()
    encrypted_env: bytes = b""  # sealed to the app; the VMM hands it to the guest as is
    pinned_host: str = ""
    host: str = ""  # where it is placed (empty until scheduled)
    cid: int = 0
    ports: tuple[PortMap, ...] = ()  # the port maps the placement granted
    state: VmState = "requested"
    desired: Desired = "running"
    reason: str = ""  # why it is rejected / exited / stopped
    exit_code: int | None = None
    boot_stage: str = ""
    boot_detail: str = ""
    last_error: str = ""
    pid: int = 0
    starts: int = 0
    restarts: int = 0  # starts after the first
    requested_ns: int = 0
    updated_ns: int = 0
    seq: int = 0  # stream sequence of the last event that changed this VM


def _at(vm: Vm, a: Applied, /, **changes: object) -> Vm:
    return replace(vm, updated_ns=a.time_ns, seq=a.seq, **changes)


def apply(state: Vm | None, a: Applied) -> Vm | None:
    """Fold one event into the VM. Nothing changes a removed VM, and only ``VmRequested``
    creates one (events for a VM never requested are ignored)."""
    if state is not None and state.state == "removed":
        return state
    match a.event:
        case VmRequested() as e if state is None:
            return Vm(
                vm_id=e.vm_id,
                app_id=e.app_id,
                name=e.name,
                resources=e.resources,
                image=e.image,
                compose_hash=e.compose_hash,
                requested_ports=e.ports,
                encrypted_env=e.encrypted_env,
                pinned_host=e.host,
                requested_ns=a.time_ns,
                updated_ns=a.time_ns,
                seq=a.seq,
            )
        case _ if state is None:
            return None
        case VmScheduled() as e:
            new_state = "scheduled" if state.state in ("requested", "rejected") else state.state
            return _at(state, a, host=e.host, cid=e.cid, ports=e.ports, state=new_state, reason="")
        case VmRejected() as e if state.state == "requested":
            return _at(state, a, state="rejected", reason=e.reason)
        case VmStartRequested():
            return _at(state, a, desired="running")
        case VmStopRequested():
            return _at(state, a, desired="stopped")
        case VmRemoveRequested():
            return _at(state, a, desired="removed")
        case VmStarted() as e:
            return _at(
                state,
                a,
                state="starting",
                host=e.host or state.host,
                pid=e.pid,
                starts=state.starts + 1,
                restarts=state.starts,
                reason="",
                exit_code=None,
                boot_stage="",
                boot_detail="",
            )
        case VmBootProgress() as e:
            ready = state.state == "starting" and e.stage in READY_STAGES
            return _at(
                state,
                a,
                boot_stage=e.stage,
                boot_detail=e.detail,
                state="running" if ready else state.state,
            )
        case VmBootError() as e:
            return _at(state, a, boot_stage=e.stage, last_error=f"{e.stage}: {e.error}")
        case VmExited() as e:
            return _at(state, a, state="exited", reason=e.reason, exit_code=e.exit_code, pid=0)
        case VmStopped():
            return _at(state, a, state="stopped", reason="stopped on request", pid=0)
        case VmRemoved():
            return _at(state, a, state="removed", pid=0)
        case _:
            return state
