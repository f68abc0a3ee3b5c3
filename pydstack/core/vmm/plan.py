"""What a host's VMM must do: ``plan(desired, observed, now) -> actions``, with no I/O.

``desired`` is the log's view of the VMs placed on this host (``VmRecord``s), ``observed`` what
the CVM backend reports (``Observed``, one per CVM it has a work dir or a process for). The
plan is level-triggered: a VMM restarted at any point recomputes it from the two and never
starts a CVM twice (a running CVM is adopted, its CID is the one in its manifest)::

    for action in plan(records, observed, now_ns=time.time_ns(), policy=RestartPolicy()):
        match action:
            case Start(vm_id=v, attempt=n): ...   # backend create + start, append VmStarted
            case Adopt(vm_id=v, pid=p): ...       # append VmStarted(adopted=True)
            ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from msgspec import Struct

from pydstack.core.events import VmRestartExhausted, VmRestartScheduled

from .record import VmRecord
from .restart import RestartNow, RestartPolicy, decide_restart

ObservedState = Literal["created", "running", "stopped", "exited", "error"]


class Observed(Struct, frozen=True, kw_only=True):
    """A CVM as its backend sees it (the core's copy of ``adapters.cvm.CvmStatus``)."""

    vm_id: str
    state: ObservedState
    cid: int | None = None
    pid: int | None = None
    exit_code: int | None = None
    reason: str = ""


class Start(Struct, frozen=True, kw_only=True):
    vm_id: str
    attempt: int = 0  # auto-restart attempt (0: first start, operator start, or host recovery)


class Adopt(Struct, frozen=True, kw_only=True):
    """Running already (started before the VMM restarted): record it, do not start again."""

    vm_id: str
    pid: int = 0


class Stop(Struct, frozen=True, kw_only=True):
    vm_id: str
    force: bool = False


class RecordExited(Struct, frozen=True, kw_only=True):
    vm_id: str
    reason: str
    exit_code: int | None = None


class RecordStopped(Struct, frozen=True, kw_only=True):
    vm_id: str


class Remove(Struct, frozen=True, kw_only=True):
    """Remove the CVM (when ``present``), then record ``VmRemoved`` and release the room."""

    vm_id: str
    present: bool


class Release(Struct, frozen=True, kw_only=True):
    """A removed VM still holds room on the host: give it back (``HostVmReleased``)."""

    vm_id: str


class Discard(Struct, frozen=True, kw_only=True):
    """A CVM the log does not place here (removed, or never known): remove it."""

    vm_id: str


class Append(Struct, frozen=True, kw_only=True):
    """Record a restart decision."""

    event: VmRestartScheduled | VmRestartExhausted


Action = Start | Adopt | Stop | RecordExited | RecordStopped | Remove | Release | Discard | Append

_LIVE = ("starting", "running")


def _running_plan(
    rec: VmRecord, o: Observed | None, now_ns: int, policy: RestartPolicy, recovering: bool
) -> list[Action]:
    vm = rec.vm
    if o is not None and o.state == "running":
        return [] if vm.state in _LIVE else [Adopt(vm_id=vm.vm_id, pid=o.pid or 0)]
    if vm.state in _LIVE:
        # The log says it runs but it does not: record why; at VMM start (host recovery) it
        # is started again at once, as dstack's VMM starts the VMs it finds not running.
        if o is not None and o.state == "stopped":
            return [RecordStopped(vm_id=vm.vm_id)]
        if o is None or o.state == "created":
            why = "the CVM process is gone (host or supervisor restarted without it)"
            out: list[Action] = [RecordExited(vm_id=vm.vm_id, reason=why)]
        else:
            out = [RecordExited(vm_id=vm.vm_id, reason=o.reason or o.state, exit_code=o.exit_code)]
        if recovering:
            out.append(Start(vm_id=vm.vm_id))
        return out
    if vm.state in ("scheduled", "stopped"):
        return [Start(vm_id=vm.vm_id)]
    if vm.state == "exited":
        if rec.start_requested_seq > rec.exited_seq:
            return [Start(vm_id=vm.vm_id)]
        match decide_restart(vm.vm_id, rec.restart, now_ns, policy):
            case RestartNow(attempt=n):
                return [Start(vm_id=vm.vm_id, attempt=n)]
            case VmRestartScheduled() | VmRestartExhausted() as e:
                return [Append(event=e)]
    return []


def plan_vm(
    rec: VmRecord,
    o: Observed | None,
    *,
    now_ns: int,
    policy: RestartPolicy,
    placed: bool = True,
    recovering: bool = False,
) -> list[Action]:
    """The actions for one VM placed on this host (see :func:`plan`)."""
    vm = rec.vm
    if vm.state == "removed":
        out: list[Action] = [Discard(vm_id=vm.vm_id)] if o is not None else []
        return out + ([Release(vm_id=vm.vm_id)] if placed else [])
    if vm.desired == "removed":
        return [Remove(vm_id=vm.vm_id, present=o is not None)]
    if vm.state in ("requested", "rejected"):
        return []
    if vm.desired == "running":
        return _running_plan(rec, o, now_ns, policy, recovering)
    # desired == "stopped"
    if o is not None and o.state == "running":
        return [Stop(vm_id=vm.vm_id, force=rec.stop_force)]
    if vm.state != "stopped":
        return [RecordStopped(vm_id=vm.vm_id)]
    return []


def plan(
    desired: Mapping[str, VmRecord],
    observed: Mapping[str, Observed],
    *,
    now_ns: int,
    policy: RestartPolicy,
    placed: frozenset[str] = frozenset(),
    recovering: bool = False,
) -> list[Action]:
    """Every action for this host: one list per VM in ``desired`` (the VMs the log places
    here), then ``Discard`` for CVMs the backend has that the log does not place here.

    ``placed``: VMs still holding room in the host aggregate. ``recovering``: the first pass
    after the VMM started, where a VM that should run but is gone is started at once.
    """
    out: list[Action] = []
    for vm_id in sorted(desired):
        out += plan_vm(
            desired[vm_id], observed.get(vm_id), now_ns=now_ns, policy=policy,
            placed=vm_id in placed, recovering=recovering,
        )  # fmt: skip
    out += [Discard(vm_id=v) for v in sorted(observed) if v not in desired]
    return out
