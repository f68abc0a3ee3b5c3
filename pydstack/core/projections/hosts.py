"""The hosts read model (capacity, usage, placements) and the placement decision.

One ``Host`` per ``dstack.host.<host_id>`` aggregate. A host's state holds only its own
capacity and the reservations on it, so a scheduler folds just the host subjects it
considers, calls :func:`decide_placement`, and appends the resulting ``HostVmPlaced`` on that
host's subject with the sequence it folded (optimistic concurrency: two schedulers can never
both take the last CID or the last vCPU). Usage::

    hosts = {h.host_id: h for h in folded_hosts}
    match decide_placement(hosts, request):
        case HostVmPlaced() as placed: ...  # append on dstack.host.<placed.host_id>
        case VmRejected() as rejected: ...  # append on dstack.vm.<vm_id>
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from msgspec import Struct
from msgspec.structs import replace

from pydstack.core.events import (
    HostHeartbeat,
    HostJoined,
    HostLeft,
    HostVmPlaced,
    HostVmReleased,
    PortMap,
    VmRejected,
    VmRequested,
    VmResources,
)
from pydstack.core.portmap import port_map_error

from ._applied import Applied

_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::", "[::]"})


class Placement(Struct, frozen=True, kw_only=True):
    """Room reserved on a host for one VM."""

    cid: int
    resources: VmResources
    ports: tuple[PortMap, ...] = ()
    seq: int = 0  # stream sequence of the HostVmPlaced
    event: str = ""  # its event id (what VmScheduled.placement_event names)

    @property
    def vcpu(self) -> int:
        return self.resources.vcpu

    @property
    def memory_mb(self) -> int:
        return self.resources.memory_mb


class Host(Struct, frozen=True, kw_only=True):
    host_id: str
    address: str = ""
    vcpu: int
    memory_mb: int
    cid_start: int
    cid_count: int
    port_range: tuple[int, int]
    public_ports: bool = False  # HostJoined.public_ports: non-loopback port maps allowed
    platform: str = ""  # HostJoined.platform: tdx / kvm / tcg / sandbox; "" unknown
    platform_reason: str = ""
    vcpu_used: int = 0
    memory_used_mb: int = 0
    # vm_id -> reservation. Never mutated: every change builds a new dict.
    placements: dict[str, Placement] = {}
    running_vms: int = 0  # as last reported by the host's heartbeat
    joined_ns: int = 0
    last_heartbeat_ns: int = 0
    left: bool = False
    left_reason: str = ""
    seq: int = 0  # stream sequence of the last event that changed this host

    @property
    def vcpu_free(self) -> int:
        return self.vcpu - self.vcpu_used

    @property
    def memory_free_mb(self) -> int:
        return self.memory_mb - self.memory_used_mb

    @property
    def cids_in_use(self) -> frozenset[int]:
        return frozenset(p.cid for p in self.placements.values())

    @property
    def ports_in_use(self) -> tuple[tuple[str, PortMap], ...]:
        """``(vm_id, port)`` of every host port reserved on this host."""
        return tuple((vm, port) for vm, p in self.placements.items() for port in p.ports)

    def lowest_free_cid(self) -> int | None:
        used = self.cids_in_use
        for cid in range(self.cid_start, self.cid_start + self.cid_count):
            if cid not in used:
                return cid
        return None


def _joined(state: Host | None, e: HostJoined, a: Applied) -> Host:
    # Joining again updates capacity and returns from "left"; reservations stay.
    base = state or Host(
        host_id=e.host_id, vcpu=0, memory_mb=0, cid_start=0, cid_count=0, port_range=(0, 0)
    )
    return replace(
        base,
        address=e.address,
        vcpu=e.vcpu,
        memory_mb=e.memory_mb,
        cid_start=e.cid_start,
        cid_count=e.cid_count,
        port_range=e.port_range,
        public_ports=e.public_ports,
        platform=e.platform,
        platform_reason=e.platform_reason,
        left=False,
        left_reason="",
        joined_ns=a.time_ns,
        last_heartbeat_ns=a.time_ns,
        seq=a.seq,
    )


def apply(state: Host | None, a: Applied) -> Host | None:
    """Fold one event into the host; only ``HostJoined`` creates one.

    Cases are ordered by how often they occur (they are disjoint, so order is free).
    """
    if state is None:
        return _joined(None, a.event, a) if isinstance(a.event, HostJoined) else None
    match a.event:
        case HostHeartbeat() as e:
            return replace(state, running_vms=e.running_vms, last_heartbeat_ns=a.time_ns, seq=a.seq)
        case HostVmPlaced() as e:
            old = state.placements.get(e.vm_id)
            new = Placement(
                cid=e.cid,
                resources=e.resources,
                ports=e.ports,
                seq=a.seq,
                event=a.id,
            )
            return replace(
                state,
                vcpu_used=state.vcpu_used + new.vcpu - (old.vcpu if old else 0),
                memory_used_mb=state.memory_used_mb + new.memory_mb - (old.memory_mb if old else 0),
                placements={**state.placements, e.vm_id: new},
                seq=a.seq,
            )
        case HostVmReleased() as e if e.vm_id in state.placements:
            gone = state.placements[e.vm_id]
            return replace(
                state,
                vcpu_used=state.vcpu_used - gone.vcpu,
                memory_used_mb=state.memory_used_mb - gone.memory_mb,
                placements={vm: p for vm, p in state.placements.items() if vm != e.vm_id},
                seq=a.seq,
            )
        case HostJoined() as e:
            return _joined(state, e, a)
        case HostLeft() as e:
            return replace(state, left=True, left_reason=e.reason, seq=a.seq)
        case _:
            return state


# ---------------------------------------------------------------------------------------------
# Placement


class _Miss(NamedTuple):
    rank: int  # how far the host got: 0 unavailable, 1 vCPU, 2 memory, 3 CID, 4/5 ports
    host_id: str
    reason: str
    free: int = 0  # the free amount of the failing resource (ranks 1 and 2)


def _port_name(p: PortMap) -> str:
    return f"{p.protocol}/{p.host_port}"


def _overlap(a: PortMap, b: PortMap) -> bool:
    if a.protocol != b.protocol or a.host_port != b.host_port:
        return False
    return a.host_address == b.host_address or bool({a.host_address, b.host_address} & _ANY_ADDRESS)


def _check_request(req: VmRequested) -> str | None:
    r = req.resources
    if r.vcpu <= 0 or r.memory_mb <= 0:
        return (
            f"vm {req.vm_id} asks for {r.vcpu} vCPU and {r.memory_mb} MB memory; both must be > 0"
        )
    for i, p in enumerate(req.ports):
        bad = port_map_error(p, public_allowed=True)  # whether the host allows it: _misfit
        if bad:
            return bad
        if any(_overlap(p, q) for q in req.ports[:i]):
            return f"host port {_port_name(p)} is mapped twice"
    return None


def _misfit(
    host: Host, req: VmRequested, now_ns: int | None, max_silence_ns: int | None
) -> _Miss | None:
    h = host.host_id
    if host.left:
        return _Miss(0, h, f"{h} has left" + (f" ({host.left_reason})" if host.left_reason else ""))
    if now_ns is not None and max_silence_ns is not None:
        silent = now_ns - max(host.last_heartbeat_ns, host.joined_ns)
        if silent > max_silence_ns:
            return _Miss(0, h, f"{h} has sent no heartbeat for {silent // 1_000_000_000} s")
    need = req.resources
    if host.vcpu_free < need.vcpu:
        return _Miss(1, h, f"{h} has only {host.vcpu_free} vCPU free", host.vcpu_free)
    if host.memory_free_mb < need.memory_mb:
        return _Miss(
            2, h, f"{h} has only {host.memory_free_mb} MB memory free", host.memory_free_mb
        )
    if host.lowest_free_cid() is None:
        last = host.cid_start + host.cid_count - 1
        return _Miss(3, h, f"{h} has no free CID (pool {host.cid_start}..{last} in use)")
    lo, hi = host.port_range
    for p in req.ports:
        if not host.public_ports and port_map_error(p, public_allowed=False):
            return _Miss(4, h, f"{h} forwards only loopback ports, not {p.host_address}")
        if not lo <= p.host_port <= hi:
            return _Miss(4, h, f"host port {_port_name(p)} is outside {h}'s range {lo}..{hi}")
    for p in req.ports:
        for vm, q in host.ports_in_use:
            if _overlap(p, q):
                return _Miss(5, h, f"host port {_port_name(p)} on {h} is in use by vm {vm}")
    return None


def _summary(misses: list[_Miss], req: VmRequested) -> str:
    rank = max(m.rank for m in misses)
    top = sorted((m for m in misses if m.rank == rank), key=lambda m: (-m.free, m.host_id))
    vcpu, mem = req.resources.vcpu, req.resources.memory_mb
    if rank == 1:
        return f"no host has {vcpu} vCPU free (largest free: {top[0].free} on {top[0].host_id})"
    if rank == 2:
        return (
            f"no host has {vcpu} vCPU and {mem} MB memory free "
            f"(most memory free with {vcpu} vCPU: {top[0].free} MB on {top[0].host_id})"
        )
    shown = "; ".join(m.reason for m in top[:3])
    more = f" (+{len(top) - 3} more)" if len(top) > 3 else ""
    return f"no host can take vm {req.vm_id}: {shown}{more}"


def _placed(host_id: str, vm_id: str, p: Placement) -> HostVmPlaced:
    return HostVmPlaced(
        host_id=host_id, vm_id=vm_id, cid=p.cid, resources=p.resources, ports=p.ports
    )


def decide_placement(
    hosts: Mapping[str, Host],
    request: VmRequested,
    *,
    now_ns: int | None = None,
    max_silence_ns: int | None = None,
) -> HostVmPlaced | VmRejected:
    """Where ``request`` goes: a ``HostVmPlaced`` to append on the host, or a ``VmRejected``.

    A host qualifies when it has not left, (given ``now_ns`` and ``max_silence_ns``) has sent a
    heartbeat recently enough, has the vCPU and memory free, a free CID, and every requested
    host port is inside its port range and not reserved by another VM (same protocol and port,
    same address or a wildcard one). ``request.host`` pins the VM to that host. Among hosts
    that qualify the one with most free vCPU wins, then most free memory, then the smallest
    host id; the CID is the lowest free one in the host's pool. The decision depends only on
    the arguments, so every replay decides the same.

    A VM that already holds a reservation gets that reservation back unchanged (its resources,
    CID and ports, whatever the request now says), so a scheduler that crashed between
    appending ``HostVmPlaced`` and ``VmScheduled`` finishes its work instead of reserving twice.
    """
    for host_id in sorted(hosts):
        held = hosts[host_id].placements.get(request.vm_id)
        if held is not None:
            return _placed(host_id, request.vm_id, held)
    problem = _check_request(request)
    if problem is not None:
        return VmRejected(vm_id=request.vm_id, reason=problem)
    if request.host:
        pinned = hosts.get(request.host)
        if pinned is None:
            return VmRejected(
                vm_id=request.vm_id, reason=f"pinned host {request.host} is not known"
            )
        candidates: list[Host] = [pinned]
    else:
        candidates = list(hosts.values())
    if not candidates:
        return VmRejected(vm_id=request.vm_id, reason="no host has joined")
    fits: list[Host] = []
    misses: list[_Miss] = []
    for host in candidates:
        miss = _misfit(host, request, now_ns, max_silence_ns)
        if miss is None:
            fits.append(host)
        else:
            misses.append(miss)
    if not fits:
        if request.host:
            return VmRejected(vm_id=request.vm_id, reason=f"pinned host: {misses[0].reason}")
        return VmRejected(vm_id=request.vm_id, reason=_summary(misses, request))
    best = min(fits, key=lambda h: (-h.vcpu_free, -h.memory_free_mb, h.host_id))
    cid = best.lowest_free_cid()
    assert cid is not None  # _misfit checked it
    return HostVmPlaced(
        host_id=best.host_id,
        vm_id=request.vm_id,
        cid=cid,
        resources=request.resources,
        ports=request.ports,
    )
