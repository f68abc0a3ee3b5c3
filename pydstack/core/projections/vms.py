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


def _created(e: VmRequested, a: Applied) -> Vm:
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


def apply(state: Vm | None, a: Applied) -> Vm | None:
    """Fold one event into the VM. Only ``VmRequested`` creates one (events for a VM never
    requested are ignored), and nothing changes a removed VM.

    Cases are ordered by how often they occur (they are disjoint, so order is free).
    """
    if state is None:
        return _created(a.event, a) if isinstance(a.event, VmRequested) else None
    if state.state == "removed":
        return state
    t, seq = a.time_ns, a.seq
    match a.event:
        case VmBootProgress() as e:
            ready = state.state == "starting" and e.stage in READY_STAGES
            return replace(
                state,
                boot_stage=e.stage,
                boot_detail=e.detail,
                state="running" if ready else state.state,
                updated_ns=t,
                seq=seq,
            )
        case VmStarted() as e:
            return replace(
                state,
                state="starting",
                host=e.host or state.host,
                pid=e.pid,
                starts=state.starts + 1,
                restarts=state.starts,
                reason="",
                exit_code=None,
                boot_stage="",
                boot_detail="",
                updated_ns=t,
                seq=seq,
            )
        case VmScheduled() as e:
            placed = "scheduled" if state.state in ("requested", "rejected") else state.state
            return replace(
                state,
                host=e.host,
                cid=e.cid,
                ports=e.ports,
                state=placed,
                reason="",
                updated_ns=t,
                seq=seq,
            )
        case VmExited() as e:
            return replace(
                state,
                state="exited",
                reason=e.reason,
                exit_code=e.exit_code,
                pid=0,
                updated_ns=t,
                seq=seq,
            )
        case VmStopped():
            return replace(
                state, state="stopped", reason="stopped on request", pid=0, updated_ns=t, seq=seq
            )
        case VmStartRequested():
            return replace(state, desired="running", updated_ns=t, seq=seq)
        case VmStopRequested():
            return replace(state, desired="stopped", updated_ns=t, seq=seq)
        case VmRemoveRequested():
            return replace(state, desired="removed", updated_ns=t, seq=seq)
        case VmRemoved():
            return replace(state, state="removed", pid=0, updated_ns=t, seq=seq)
        case VmBootError() as e:
            error = f"{e.stage}: {e.error}"
            return replace(state, boot_stage=e.stage, last_error=error, updated_ns=t, seq=seq)
        case VmRejected() as e if state.state == "requested":
            return replace(state, state="rejected", reason=e.reason, updated_ns=t, seq=seq)
        case _:  # a repeated VmRequested, a late VmRejected, other aggregates' events
            return state
