"""Events of gateway nodes (``dstack.gateway.<id>``) and CVMs (``dstack.cvm.<instance_id>``)."""

from __future__ import annotations

from ._base import Event


class GatewayNodeJoined(Event, tag="GatewayNodeJoined", frozen=True):
    node_id: str
    wg_public_key: str
    tunnel_ip: str
    endpoint: str
    base_domain: str


class GatewayNodeDown(Event, tag="GatewayNodeDown", frozen=True):
    node_id: str
    reason: str = ""


class GatewayNodeUp(Event, tag="GatewayNodeUp", frozen=True):
    node_id: str


class CvmRegistered(Event, tag="CvmRegistered", frozen=True):
    app_id: str
    instance_id: str
    compose_hash: str
    wg_public_key: str
    tunnel_ip: str
    port_policy: str = "allow-all"
    attestation_hash: str = ""


class CvmLiveness(Event, tag="CvmLiveness", frozen=True):
    instance_id: str
    node_id: str
    last_handshake: int  # unix seconds
    rx_bytes: int = 0
    tx_bytes: int = 0


class CvmRecycled(Event, tag="CvmRecycled", frozen=True):
    instance_id: str
    reason: str = ""
