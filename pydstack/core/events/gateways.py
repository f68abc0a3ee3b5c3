"""Events of a gateway cluster (``dstack.gateway.<cluster>``) and of CVMs (``dstack.cvm.<id>``).

The cluster aggregate is the one place where tunnel IPs are handed out: node membership and
the IP ledger (``TunnelIpAllocated`` / ``TunnelIpReleased``) are appended there with optimistic
concurrency, so two writers can never hold the same address. Each registration also appends
``CvmRegistered`` on the CVM's own subject in the same atomic commit; recycling and removal
append ``TunnelIpReleased`` + ``CvmRecycled`` / ``CvmRemoved`` the same way.

``cluster == ""`` on node events written before the field existed means the default cluster.
"""

from __future__ import annotations

import msgspec

from ._base import Event


class PortAttrs(msgspec.Struct, frozen=True, kw_only=True):
    """dstack's ``PortAttrs``: per-port behaviour the app asks of the gateway."""

    port: int
    pp: bool = False  # send a PROXY protocol header on connections to this port


class GatewayNodeJoined(Event, tag="GatewayNodeJoined", frozen=True):
    node_id: str
    wg_public_key: str
    tunnel_ip: str
    endpoint: str
    base_domain: str
    cluster: str = ""  # added: the cluster aggregate it joined ("" = default)
    url: str = ""  # added: the node's RPC URL (dstack's GatewayNodeInfo.url)


class GatewayNodeDown(Event, tag="GatewayNodeDown", frozen=True):
    node_id: str
    reason: str = ""
    cluster: str = ""  # added


class GatewayNodeUp(Event, tag="GatewayNodeUp", frozen=True):
    node_id: str
    cluster: str = ""  # added


class TunnelIpAllocated(Event, tag="TunnelIpAllocated", frozen=True):
    """The cluster's IP ledger: ``instance_id`` holds ``tunnel_ip`` with this WireGuard key.

    Written for every admission, also a re-registration that keeps its address (a renewal);
    the instance's app binding starts with its first allocation and never changes.
    """

    cluster: str
    instance_id: str
    app_id: str
    wg_public_key: str
    tunnel_ip: str


class TunnelIpReleased(Event, tag="TunnelIpReleased", frozen=True):
    """The ledger entry of ``instance_id`` ends; its address may be handed out again."""

    cluster: str
    instance_id: str
    tunnel_ip: str
    reason: str = ""  # "recycled" | "removed" | free text


class CvmRegistered(Event, tag="CvmRegistered", frozen=True):
    app_id: str
    instance_id: str
    compose_hash: str
    wg_public_key: str
    tunnel_ip: str
    # "allow-all": any port may be proxied; "restrict": only the ports listed in `ports`
    # (dstack's restrict_mode). The field kept its name and type when `ports` was added.
    port_policy: str = "allow-all"
    attestation_hash: str = ""
    ports: tuple[PortAttrs, ...] = ()  # added: dstack's PortPolicy.ports
    cluster: str = ""  # added: the cluster whose ledger admitted it ("" = default)


class CvmLiveness(Event, tag="CvmLiveness", frozen=True):
    instance_id: str
    node_id: str
    last_handshake: int  # unix seconds
    rx_bytes: int = 0
    tx_bytes: int = 0


class CvmRecycled(Event, tag="CvmRecycled", frozen=True):
    instance_id: str
    reason: str = ""


class CvmRemoved(Event, tag="CvmRemoved", frozen=True):
    """An operator (or the VM's removal) took the instance out of every gateway."""

    instance_id: str
    reason: str = ""


class CvmRegistrationRefused(Event, tag="CvmRegistrationRefused", frozen=True):
    """An attested caller asked to register and was refused; ``code`` is a short label."""

    instance_id: str
    app_id: str
    code: str  # bad_key | key_in_use | app_mismatch | unauthorized | pool_exhausted | ...
    reason: str
    wg_public_key: str = ""
    compose_hash: str = ""
    attestation_hash: str = ""
    cluster: str = ""
