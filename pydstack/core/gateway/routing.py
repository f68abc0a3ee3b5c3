"""The gateway routing table and backend selection (pure; time is passed in).

A `RoutingTable` is an immutable value: the gateway actor builds a new one from its fold
and hands it to the data plane, which swaps it in atomically. `pick_backends` turns a
`Route` into the instances to try, like dstack: an instance id goes straight to that
instance; an app id goes to its instances with a fresh WireGuard handshake, most recent
first, at most ``top_n`` (the proxy connects to them concurrently; first wins). The
instance's port policy is applied before anything is picked, failing closed.

Usage::

    table = RoutingTable.build([Instance("i1", "app1", "10.4.0.2", last_handshake=t)],
                               base_domains=("app.example.com",))
    picked = pick_backends(route, table, now=time.time())
    if isinstance(picked, Refusal): ...
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .sni import Route

HANDSHAKE_STALE_S = 1800.0  # dstack's timeouts.handshake_stale ("30m")
TOP_N = 3  # dstack's proxy.connect_top_n


@dataclass(frozen=True, slots=True)
class PortRule:
    """An allowed port; ``proxy_protocol`` is 0 (none), 1 or 2 (PROXY header version)."""

    port: int
    proxy_protocol: int = 0


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """dstack's port policy: open (any port) unless ``restrict``; rules carry PROXY flags."""

    restrict: bool = False
    rules: tuple[PortRule, ...] = ()

    def rule(self, port: int) -> PortRule | None:
        """The rule for ``port``: its own, or an open default; None when refused."""
        for r in self.rules:
            if r.port == port:
                return r
        return None if self.restrict else PortRule(port)


OPEN = PortPolicy()


@dataclass(frozen=True, slots=True)
class Instance:
    """One routable CVM: its ids, tunnel IP and the last WireGuard handshake (unix s)."""

    instance_id: str
    app_id: str
    ip: str
    last_handshake: float | None = None
    port_policy: PortPolicy = OPEN


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Base domains and instances, indexed by instance id and by app id."""

    base_domains: tuple[str, ...] = ()
    instances: Mapping[str, Instance] = field(default_factory=lambda: MappingProxyType({}))
    apps: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, instances: Iterable[Instance], base_domains: Iterable[str] = ()) -> RoutingTable:
        by_id: dict[str, Instance] = {}
        apps: dict[str, list[str]] = {}
        for inst in instances:
            if inst.instance_id in by_id:
                raise ValueError(f"instance {inst.instance_id} listed twice")
            by_id[inst.instance_id] = inst
            apps.setdefault(inst.app_id, []).append(inst.instance_id)
        return cls(
            base_domains=tuple(sorted({d.lower().rstrip(".") for d in base_domains})),
            instances=MappingProxyType(by_id),
            apps=MappingProxyType({a: tuple(sorted(ids)) for a, ids in apps.items()}),
        )


@dataclass(frozen=True, slots=True)
class Backend:
    """One connect target: the instance, its address, port and PROXY header version."""

    instance_id: str
    ip: str
    port: int
    proxy_protocol: int = 0


class RefusalReason(enum.Enum):
    UNKNOWN_ID = "unknown_id"
    NO_LIVE_INSTANCE = "no_live_instance"
    PORT_DENIED = "port_denied"


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: RefusalReason
    detail: str


@dataclass(frozen=True, slots=True)
class Selection:
    """The backends to race (best first) and the app they belong to (for limits)."""

    kind: str  # "instance" or "app"
    app_id: str
    backends: tuple[Backend, ...]


def pick_backends(
    route: Route,
    table: RoutingTable,
    now: float,
    *,
    top_n: int = TOP_N,
    handshake_stale: float = HANDSHAKE_STALE_S,
) -> Selection | Refusal:
    """Backends for ``route``: the named instance, or the app's freshest ``top_n``."""
    direct = table.instances.get(route.id)
    if direct is not None:
        rule = direct.port_policy.rule(route.port)
        if rule is None:
            return Refusal(RefusalReason.PORT_DENIED, f"port {route.port} of {route.id}")
        backend = Backend(direct.instance_id, direct.ip, route.port, rule.proxy_protocol)
        return Selection("instance", direct.app_id, (backend,))
    members = table.apps.get(route.id)
    if not members:
        return Refusal(RefusalReason.UNKNOWN_ID, f"no instance or app {route.id!r}")
    allowed = []
    for instance_id in members:
        inst = table.instances[instance_id]
        rule = inst.port_policy.rule(route.port)
        if rule is not None:
            allowed.append((inst, rule))
    if not allowed:
        return Refusal(RefusalReason.PORT_DENIED, f"port {route.port} of app {route.id}")
    fresh = [
        (inst, rule)
        for inst, rule in allowed
        if inst.last_handshake is not None and now - inst.last_handshake < handshake_stale
    ]
    if not fresh:
        return Refusal(
            RefusalReason.NO_LIVE_INSTANCE,
            f"app {route.id}: no handshake within {handshake_stale:.0f}s on any instance",
        )
    fresh.sort(key=lambda pair: (-(pair[0].last_handshake or 0.0), pair[0].instance_id))
    backends = tuple(
        Backend(inst.instance_id, inst.ip, route.port, rule.proxy_protocol)
        for inst, rule in fresh[: max(top_n, 1)]
    )
    return Selection("app", route.id, backends)
