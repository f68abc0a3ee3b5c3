"""A gateway cluster folded from the log, and the registration/recycle decisions. Pure.

Two aggregates feed it (``docs`` in ``core/events/gateways.py``):

- ``dstack.gateway.<cluster>``: nodes (join/down/up) and the IP ledger
  (``TunnelIpAllocated`` / ``TunnelIpReleased``). Every allocation decision is taken on this
  subject alone and appended with its expected sequence, so an address is never held twice.
- ``dstack.cvm.<instance_id>``: ``CvmRegistered``, ``CvmLiveness``, ``CvmRecycled``,
  ``CvmRemoved`` - written in the same atomic commit as the ledger entry they go with.

An instance is *routed* exactly when its last ``CvmRegistered`` matches its active lease
(same key and address; each ledger entry admits one record) and no ``CvmRecycled`` /
``CvmRemoved`` came after it; a record that ended comes back only through a new
registration. Usage::

    state = fold(applied_events, ClusterState(cluster="default"))
    match decide_register(state, request, AddressPlan("10.0.0.0/25")):
        case Admission() as a: ...  # a.ledger on the cluster subject, a.record on the CVM's
        case Refused() as r: ...     # r.code, r.reason

Recycling and liveness are decided in ``recycle.py``, the routing table built in ``table.py``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec
from msgspec.structs import replace

from pydstack.core.events import (
    CvmLiveness,
    CvmRecycled,
    CvmRegistered,
    CvmRemoved,
    GatewayNodeDown,
    GatewayNodeJoined,
    GatewayNodeUp,
    TunnelIpAllocated,
    TunnelIpReleased,
    subject,
)
from pydstack.core.projections import Applied

from .ports import DeclaredPorts

DEFAULT_CLUSTER: Final = "default"
Status = Literal["active", "recycled", "removed"]
# "unauthorized" is the authorization webhook's (actor side); the rest are decide_register's.
# "id_in_use" (an app id as instance id or the reverse) and "not_same_instance" (another
# attested identity under an instance id that holds a lease) are refused, never recorded.
RefusalCode = Literal[
    "bad_request", "bad_key", "key_in_use", "app_mismatch", "pool_exhausted", "node_down",
    "unauthorized", "id_in_use", "not_same_instance",
]  # fmt: skip


class Node(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    wg_public_key: str
    tunnel_ip: str
    endpoint: str
    base_domain: str
    url: str = ""
    up: bool = True
    wg_backend: str = ""  # GatewayNodeJoined's ("" before the field)
    wg_backend_reason: str = ""


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """An active ledger entry: ``instance_id`` holds ``tunnel_ip`` with ``wg_public_key``."""

    instance_id: str
    app_id: str
    wg_public_key: str
    tunnel_ip: str
    seq: int = 0
    compose_hash: str = ""  # the attested identity holding it ("" on old entries: any)
    mr_system: str = ""

    def same_instance(self, compose_hash: str, mr_system: str) -> bool:
        """Whether an attestation with these values is the TD that holds the lease (the
        app id is bound separately): its compose and its measured OS + key provider."""
        return all(
            not mine or mine == theirs
            for mine, theirs in ((self.compose_hash, compose_hash), (self.mr_system, mr_system))
        )


class CvmRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The last registration of an instance, and what happened to it since."""

    instance_id: str
    app_id: str
    compose_hash: str
    wg_public_key: str
    tunnel_ip: str
    port_policy: DeclaredPorts = DeclaredPorts()
    attestation_hash: str = ""
    registered_s: int = 0  # stream time of the registration, unix seconds
    seq: int = 0  # stream sequence of the CvmRegistered
    status: Status = "active"
    ended_seq: int = 0
    handshakes: dict[str, int] = {}  # node_id -> last handshake (unix s); replaced, not mutated

    def last_seen(self) -> int:
        return max(self.handshakes.values(), default=self.registered_s)


@dataclass(slots=True)
class ClusterState:
    """One cluster as folded so far. :func:`fold` returns a new one and never mutates input."""

    cluster: str = DEFAULT_CLUSTER
    nodes: dict[str, Node] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)  # instance_id -> active lease
    ip_holder: dict[str, str] = field(default_factory=dict)  # tunnel ip -> instance_id
    key_holder: dict[str, str] = field(default_factory=dict)  # wg key -> instance_id
    bound_app: dict[str, str] = field(default_factory=dict)  # instance_id -> app_id, forever
    instances: dict[str, CvmRecord] = field(default_factory=dict)  # incl. ended records
    seq: int = 0
    held_ips: set[int] = field(default_factory=set)  # ip_holder's keys as ints (allocation)
    apps: set[str] = field(default_factory=set)  # bound_app's values: ids that are app ids

    def id_kind(self, ident: str) -> str | None:
        """ "app" or "instance" when ``ident`` is already one on the ledger (ids of the two
        kinds share the routing namespace ``<id>.<domain>``, so one id is never both)."""
        if ident in self.apps:
            return "app"
        return "instance" if ident in self.bound_app else None

    def copy(self) -> ClusterState:
        return ClusterState(
            self.cluster,
            dict(self.nodes),
            dict(self.leases),
            dict(self.ip_holder),
            dict(self.key_holder),
            dict(self.bound_app),
            dict(self.instances),
            self.seq,
            set(self.held_ips),
            set(self.apps),
        )

    def routed(self, instance_id: str) -> CvmRecord | None:
        """The instance if it is routed now (see the module doc), else None."""
        inst = self.instances.get(instance_id)
        lease = self.leases.get(instance_id)
        if inst is None or lease is None or inst.status != "active":
            return None
        if (lease.wg_public_key, lease.tunnel_ip) != (inst.wg_public_key, inst.tunnel_ip):
            return None
        return inst

    def routed_instances(self) -> list[CvmRecord]:
        return [i for iid in sorted(self.instances) if (i := self.routed(iid)) is not None]


# -- the fold -------------------------------------------------------------------------------


def _ours(state: ClusterState, cluster: str) -> bool:
    return (cluster or DEFAULT_CLUSTER) == state.cluster


def _ip_int(text: str) -> int:
    """A dotted IPv4 address as an int (the ledger holds only addresses our deciders wrote;
    anything unparsable counts as nothing, it cannot shadow a real address)."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        return -1
    a, b, c, d = (int(p) for p in parts)
    return (a << 24) | (b << 16) | (c << 8) | d


def _drop_lease(s: ClusterState, instance_id: str) -> None:
    old = s.leases.pop(instance_id, None)
    if old is not None:
        s.ip_holder.pop(old.tunnel_ip, None)
        s.held_ips.discard(_ip_int(old.tunnel_ip))
        s.key_holder.pop(old.wg_public_key, None)


def _node_ips(s: ClusterState) -> set[str]:
    return {n.tunnel_ip for n in s.nodes.values()}


def _apply(s: ClusterState, a: Applied) -> None:
    e = a.event
    match e:
        case GatewayNodeJoined() if _ours(s, e.cluster):
            holder = s.ip_holder.get(e.tunnel_ip)
            others = {n.tunnel_ip for n in s.nodes.values() if n.node_id != e.node_id}
            if holder is not None or e.tunnel_ip in others:
                return  # an address already in use: never written by our deciders; ignored
            s.nodes[e.node_id] = Node(
                node_id=e.node_id,
                wg_public_key=e.wg_public_key,
                tunnel_ip=e.tunnel_ip,
                endpoint=e.endpoint,
                base_domain=e.base_domain,
                url=e.url,
                wg_backend=e.wg_backend,
                wg_backend_reason=e.wg_backend_reason,
            )
        case GatewayNodeDown() if _ours(s, e.cluster) and e.node_id in s.nodes:
            s.nodes[e.node_id] = replace(s.nodes[e.node_id], up=False)
        case GatewayNodeUp() if _ours(s, e.cluster) and e.node_id in s.nodes:
            s.nodes[e.node_id] = replace(s.nodes[e.node_id], up=True)
        case TunnelIpAllocated() if _ours(s, e.cluster):
            iid = e.instance_id
            if s.bound_app.get(iid, e.app_id) != e.app_id:
                return
            if iid == e.app_id or iid in s.apps or e.app_id in s.bound_app:
                return  # an app id as instance id or the reverse: one namespace for routing
            held = s.leases.get(iid)
            if held is not None and not held.same_instance(e.compose_hash, e.mr_system):
                if not (e.app_upgrade and held.same_instance(held.compose_hash, e.mr_system)):
                    return  # another attested identity under an instance id holding a lease
            if s.ip_holder.get(e.tunnel_ip, iid) != iid or e.tunnel_ip in _node_ips(s):
                return
            if s.key_holder.get(e.wg_public_key, iid) != iid:
                return
            _drop_lease(s, iid)
            s.leases[iid] = Lease(
                instance_id=iid,
                app_id=e.app_id,
                wg_public_key=e.wg_public_key,
                tunnel_ip=e.tunnel_ip,
                seq=a.seq,
                compose_hash=e.compose_hash,
                mr_system=e.mr_system,
            )
            s.ip_holder[e.tunnel_ip] = iid
            s.held_ips.add(_ip_int(e.tunnel_ip))
            s.key_holder[e.wg_public_key] = iid
            s.bound_app[iid] = e.app_id
            s.apps.add(e.app_id)
        case TunnelIpReleased() if _ours(s, e.cluster):
            lease = s.leases.get(e.instance_id)
            if lease is not None and lease.tunnel_ip == e.tunnel_ip:
                _drop_lease(s, e.instance_id)
        case CvmRegistered() if _ours(s, e.cluster):
            lease = s.leases.get(e.instance_id)
            if lease is None or (lease.app_id, lease.wg_public_key, lease.tunnel_ip) != (
                e.app_id,
                e.wg_public_key,
                e.tunnel_ip,
            ):
                return  # not admitted by this cluster's ledger
            prev = s.instances.get(e.instance_id)
            if prev is not None and prev.seq > lease.seq:
                return  # one ledger entry admits one record: a replayed record changes nothing
            keep = prev is not None and prev.status == "active"
            keep = keep and prev is not None and prev.wg_public_key == e.wg_public_key
            s.instances[e.instance_id] = CvmRecord(
                instance_id=e.instance_id,
                app_id=e.app_id,
                compose_hash=e.compose_hash,
                wg_public_key=e.wg_public_key,
                tunnel_ip=e.tunnel_ip,
                port_policy=DeclaredPorts.of(e.port_policy == "restrict", e.ports),
                attestation_hash=e.attestation_hash,
                registered_s=a.time_ns // 1_000_000_000,
                seq=a.seq,
                handshakes=prev.handshakes if keep and prev is not None else {},
            )
        case CvmLiveness():
            inst = s.instances.get(e.instance_id)
            if inst is None or inst.status != "active" or e.node_id not in s.nodes:
                return
            if e.last_handshake > inst.handshakes.get(e.node_id, 0):
                seen = dict(inst.handshakes)
                seen[e.node_id] = e.last_handshake
                s.instances[e.instance_id] = replace(inst, handshakes=seen)
        case CvmRecycled() | CvmRemoved():
            inst = s.instances.get(e.instance_id)
            if inst is not None and inst.status == "active":
                status: Status = "recycled" if isinstance(e, CvmRecycled) else "removed"
                s.instances[e.instance_id] = replace(inst, status=status, ended_seq=a.seq)
        case _:
            pass


def cluster_subject(cluster: str) -> str:
    """The cluster aggregate: ``dstack.gateway.<cluster>``."""
    return subject("gateway", cluster)


_LEDGER = (GatewayNodeJoined, GatewayNodeDown, GatewayNodeUp, TunnelIpAllocated, TunnelIpReleased)
_RECORD = (CvmRegistered, CvmLiveness, CvmRecycled, CvmRemoved)


def on_its_subject(cluster: str, subj: str, event: object) -> bool:
    """Whether the fold may take ``event`` stored on ``subj``: ledger and node events only
    from the cluster subject (whose sequence guards allocation), CVM events only from their
    instance's subject. Readers drop everything else before folding."""
    if isinstance(event, _LEDGER):
        return subj == cluster_subject(cluster)
    if isinstance(event, _RECORD):
        return subj == f"dstack.cvm.{event.instance_id}"
    return False


def fold(events: Iterable[Applied], start: ClusterState | None = None) -> ClusterState:
    """Fold events (ascending ``seq``) onto a copy of ``start``; events at or below
    ``start.seq`` are skipped, so a redelivered prefix is harmless."""
    s = start.copy() if start is not None else ClusterState()
    for a in events:
        if a.seq <= s.seq:
            continue
        s.seq = a.seq
        _apply(s, a)
    return s


def apply(state: ClusterState, a: Applied) -> ClusterState:
    """One event (a copy of the state per call: batch with :func:`fold` when replaying)."""
    return fold((a,), state)


# -- decisions ----------------------------------------------------------------------------


class AddressPlan(msgspec.Struct, frozen=True):
    """Where client addresses come from (dstack: ``client_ip_range``, ``reserved_net``)."""

    client_ip_range: str = "10.0.0.0/25"
    reserved: tuple[str, ...] = ("10.0.0.1/32",)


class RegisterRequest(msgspec.Struct, frozen=True, kw_only=True):
    """An attested CVM's request: identity from its attestation, key and ports from it."""

    app_id: str
    instance_id: str
    compose_hash: str
    wg_public_key: str
    port_policy: DeclaredPorts = DeclaredPorts()
    attestation_hash: str = ""
    mr_system: str = ""  # hex, the attested OS + key provider measurement (AppInfo.mr_system)
    # the registrar found compose_hash among those the app's own events on the log allow
    compose_on_log: bool = False


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """Append ``ledger`` on the cluster subject and ``record`` on the CVM's, atomically."""

    tunnel_ip: str
    renewed: bool  # True when the instance kept the address it already held
    ledger: TunnelIpAllocated
    record: CvmRegistered


class Refused(msgspec.Struct, frozen=True, kw_only=True):
    code: RefusalCode
    reason: str


def canonical_key(text: str) -> str | None:
    """A WireGuard public key in canonical base64, or None if it is not 32 bytes of base64.

    Non-canonical spellings of one key are refused, so "key owned by another instance"
    cannot be dodged by re-encoding; the all-zero key is refused too.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32 or raw == bytes(32) or base64.b64encode(raw).decode() != text:
        return None
    return text


def _free_address(state: ClusterState, plan: AddressPlan) -> str | None:
    """The lowest host address of the range that is neither reserved, a node's nor leased."""
    net = ipaddress.IPv4Network(plan.client_ip_range, strict=False)
    reserved = [ipaddress.IPv4Network(r, strict=False) for r in plan.reserved]
    spans = [(int(r.network_address), int(r.broadcast_address)) for r in reserved]
    taken = state.held_ips | {_ip_int(n.tunnel_ip) for n in state.nodes.values()}
    first, last = int(net.network_address), int(net.broadcast_address)
    if net.prefixlen < 31:  # the network and broadcast addresses are not hosts
        first, last = first + 1, last - 1
    for n in range(first, last + 1):
        if n in taken or any(lo <= n <= hi for lo, hi in spans):
            continue
        return str(ipaddress.IPv4Address(n))
    return None


def decide_register(
    state: ClusterState, req: RegisterRequest, plan: AddressPlan, *, node_id: str | None = None
) -> Admission | Refused:
    """Admit a registration or say why not. Needs only the cluster subject folded: every
    fact it relies on (leases, keys, app bindings, node addresses) is on the ledger."""
    if not req.app_id or not req.instance_id:
        return Refused(code="bad_request", reason="app id and instance id must not be empty")
    node = state.nodes.get(node_id) if node_id is not None else None
    if node is not None and not node.up:
        return Refused(code="node_down", reason=f"gateway node {node_id} is marked down")
    key = canonical_key(req.wg_public_key)
    if key is None:
        return Refused(code="bad_key", reason="client_public_key is not a WireGuard public key")
    if req.instance_id == req.app_id or state.id_kind(req.instance_id) == "app":
        return Refused(code="id_in_use", reason=f"instance id {req.instance_id} is an app id")
    if state.id_kind(req.app_id) == "instance":
        return Refused(code="id_in_use", reason=f"app id {req.app_id} is an instance id")
    bound = state.bound_app.get(req.instance_id)
    if bound is not None and bound != req.app_id:
        return Refused(
            code="app_mismatch", reason=f"instance {req.instance_id} is bound to app {bound}"
        )
    lease = state.leases.get(req.instance_id)
    upgrade = False
    if lease is not None and not lease.same_instance(req.compose_hash, req.mr_system):
        # an upgrade of the same instance: its app's events allow the new compose, same OS
        upgrade = req.compose_on_log and lease.same_instance(lease.compose_hash, req.mr_system)
        if not upgrade:
            return Refused(
                code="not_same_instance",
                reason=f"instance {req.instance_id} holds its address under another attested "
                "identity (mr_system differs, or a compose hash its app's events on the log do "
                "not name)",
            )
    holder = state.key_holder.get(key)
    if holder is not None and holder != req.instance_id:
        return Refused(
            code="key_in_use", reason="WireGuard public key is registered to another instance"
        )
    ip = lease.tunnel_ip if lease is not None else _free_address(state, plan)
    if ip is None:
        return Refused(code="pool_exhausted", reason=f"no free address in {plan.client_ip_range}")
    pp = req.port_policy
    return Admission(
        tunnel_ip=ip,
        renewed=lease is not None,
        ledger=TunnelIpAllocated(
            cluster=state.cluster,
            instance_id=req.instance_id,
            app_id=req.app_id,
            wg_public_key=key,
            tunnel_ip=ip,
            compose_hash=req.compose_hash,
            mr_system=req.mr_system,
            app_upgrade=upgrade,
        ),
        record=CvmRegistered(
            app_id=req.app_id,
            instance_id=req.instance_id,
            compose_hash=req.compose_hash,
            wg_public_key=key,
            tunnel_ip=ip,
            port_policy="restrict" if pp.restrict else "allow-all",
            ports=pp.ports,
            attestation_hash=req.attestation_hash,
            cluster="" if state.cluster == DEFAULT_CLUSTER else state.cluster,
            mr_system=req.mr_system,
        ),
    )


def decide_join(state: ClusterState, node: GatewayNodeJoined) -> GatewayNodeJoined | Refused:
    """A node may join (or re-join with new settings) at an address nobody else holds."""
    if canonical_key(node.wg_public_key) is None:
        return Refused(code="bad_key", reason="node wg_public_key is not a WireGuard public key")
    if not _ours(state, node.cluster):
        return Refused(code="bad_request", reason=f"node names cluster {node.cluster!r}")
    holder = state.ip_holder.get(node.tunnel_ip)
    other = next(
        (
            n.node_id
            for n in state.nodes.values()
            if n.tunnel_ip == node.tunnel_ip and n.node_id != node.node_id
        ),
        None,
    )
    if holder is not None or other is not None:
        return Refused(
            code="bad_request",
            reason=f"tunnel ip {node.tunnel_ip} is held by {holder or other}",
        )
    return node
