"""What a gateway node serves: desired WireGuard peers and the routing table. Pure values.

A ``ClusterTable`` is derived from the cluster fold (``cluster.routing_table(state)``) and is
the same on every node that folded the same log prefix. Its canonical encoding (JSON, fields
in declaration order, every collection sorted) and its sha256 ``digest()`` let nodes,
metrics and the CLI compare tables without shipping them::

    table = routing_table(state)
    table.digest()                      # 'b1c3…' - equal on every node at the same seq
    index = TableIndex.of(table)
    index.resolve("5bb4ff9a…")          # instance id -> (its route,), app id -> all of its
    index.routes_for_app(app_id)        # the load-balancing candidates of an app
    route.port_policy.allows(8080)      # fail closed in restrict mode

Ids are lower-case hex as dstack prints them (``app_id``: 40 hex digits, ``instance_id``: 40).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

from pydstack.core.events import PortAttrs

from .cluster import ClusterState
from .ports import DeclaredPorts

__all__ = [
    "AppRoute", "ClusterTable", "DeclaredPorts", "GatewayPeer", "InstanceRoute", "PortAttrs",
    "TableIndex", "WgPeer", "routing_table",
]  # fmt: skip

_ENCODER: Final = msgspec.json.Encoder()


class WgPeer(msgspec.Struct, frozen=True, kw_only=True):
    """One WireGuard peer a gateway node's device must have: a CVM."""

    public_key: str  # base64, as `wg` prints it
    allowed_ip: str  # "10.0.0.2/32"


class GatewayPeer(msgspec.Struct, frozen=True, kw_only=True):
    """One gateway node as CVMs see it (dstack's WireGuardPeer + GatewayNodeInfo)."""

    node_id: str
    public_key: str
    tunnel_ip: str
    endpoint: str
    base_domain: str
    url: str = ""
    up: bool = True


class InstanceRoute(msgspec.Struct, frozen=True, kw_only=True):
    """Where an instance is reached: its tunnel IP and its port policy."""

    instance_id: str
    app_id: str
    tunnel_ip: str
    wg_public_key: str  # joins the device's handshake stats to the route
    port_policy: DeclaredPorts = DeclaredPorts()


class AppRoute(msgspec.Struct, frozen=True, kw_only=True):
    app_id: str
    instances: tuple[str, ...]  # sorted instance ids


class ClusterTable(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a node reconciles, in canonical order (see the module doc)."""

    cluster: str
    seq: int = 0  # stream sequence folded; NOT part of the digest (nodes compare content)
    base_domains: tuple[str, ...] = ()
    gateways: tuple[GatewayPeer, ...] = ()  # sorted by node_id
    peers: tuple[WgPeer, ...] = ()  # sorted by public_key
    routes: tuple[InstanceRoute, ...] = ()  # sorted by instance_id
    apps: tuple[AppRoute, ...] = ()  # sorted by app_id

    def encode(self) -> bytes:
        """Canonical bytes of the content (without ``seq``): equal tables, equal bytes."""
        return _ENCODER.encode(msgspec.structs.replace(self, seq=0))

    def digest(self) -> str:
        """sha256 of :meth:`encode`, hex."""
        return hashlib.sha256(self.encode()).hexdigest()

    def peer_digest(self) -> str:
        """sha256 of the peer set alone (what the WireGuard device must hold)."""
        return hashlib.sha256(_ENCODER.encode(self.peers)).hexdigest()

    @classmethod
    def decode(cls, data: bytes) -> ClusterTable:
        return msgspec.json.decode(data, type=cls)


@dataclass(frozen=True, slots=True)
class TableIndex:
    """Lookups over one table; build once per table (``TableIndex.of(table)``)."""

    table: ClusterTable
    by_instance: Mapping[str, InstanceRoute] = field(default_factory=dict)
    by_app: Mapping[str, tuple[InstanceRoute, ...]] = field(default_factory=dict)
    by_ip: Mapping[str, InstanceRoute] = field(default_factory=dict)

    @classmethod
    def of(cls, table: ClusterTable) -> TableIndex:
        by_instance = {r.instance_id: r for r in table.routes}
        by_app = {a.app_id: tuple(by_instance[i] for i in a.instances) for a in table.apps}
        by_ip = {r.tunnel_ip: r for r in table.routes}
        return cls(table, by_instance, by_app, by_ip)

    def resolve(self, ident: str) -> tuple[InstanceRoute, ...]:
        """dstack's ``<id>`` rule: an instance id routes to that instance, an app id to all
        of its instances (the proxy picks among them); unknown ids route nowhere."""
        ident = ident.lower()
        route = self.by_instance.get(ident)
        if route is not None:
            return (route,)
        return self.by_app.get(ident, ())

    def routes_for_app(self, app_id: str) -> tuple[InstanceRoute, ...]:
        return self.by_app.get(app_id.lower(), ())


def routing_table(state: ClusterState, domains: Iterable[str] = ()) -> ClusterTable:
    """The desired peers and routes of every node of the cluster (canonical order).

    ``domains``: base domains added to the cluster (``GatewayDomainAdded``, still active),
    served by every node alongside the base domains nodes joined with."""
    routed = state.routed_instances()
    apps: dict[str, list[str]] = {}
    for inst in routed:
        apps.setdefault(inst.app_id, []).append(inst.instance_id)
    nodes = [state.nodes[k] for k in sorted(state.nodes)]
    return ClusterTable(
        cluster=state.cluster,
        seq=state.seq,
        base_domains=tuple(
            sorted({n.base_domain for n in nodes if n.up and n.base_domain} | set(domains))
        ),
        gateways=tuple(
            GatewayPeer(
                node_id=n.node_id,
                public_key=n.wg_public_key,
                tunnel_ip=n.tunnel_ip,
                endpoint=n.endpoint,
                base_domain=n.base_domain,
                url=n.url,
                up=n.up,
            )
            for n in nodes
        ),
        peers=tuple(
            sorted(
                (
                    WgPeer(public_key=i.wg_public_key, allowed_ip=f"{i.tunnel_ip}/32")
                    for i in routed
                ),
                key=lambda p: p.public_key,
            )
        ),
        routes=tuple(
            InstanceRoute(
                instance_id=i.instance_id,
                app_id=i.app_id,
                tunnel_ip=i.tunnel_ip,
                wg_public_key=i.wg_public_key,
                port_policy=i.port_policy,
            )
            for i in routed
        ),
        apps=tuple(AppRoute(app_id=k, instances=tuple(sorted(v))) for k, v in sorted(apps.items())),
    )
