"""Events of gateway clusters (``dstack.gateway.<node_id>``) and CVMs (``dstack.cvm.<instance_id>``)."""

from __future__ import annotations

from ._base import Event


class GatewayNodeJoined(Event, tag="GatewayNodeJoined"):
    node_id: str
    wg_public_key: str
    tunnel_ip: str
    endpoint: str
    base_domain: str


class GatewayNodeDown(Event, tag="GatewayNodeDown"):
    node_id: str
    reason: str = ""


class GatewayNodeUp(Event, tag="GatewayNodeUp"):
    node_id: str


class CvmRegistered(Event, tag="CvmRegistered"):
    app_id: str
    instance_id: str
    compose_hash: str
    wg_public_key: str
    tunnel_ip: str
    port_policy: str = "allow-all"
    attestation_hash: str = ""


class CvmLiveness(Event, tag="CvmLiveness"):
    instance_id: str
    node_id: str
    last_handshake: int  # unix seconds
    rx_bytes: int = 0
    tx_bytes: int = 0


class CvmRecycled(Event, tag="CvmRecycled"):
    instance_id: str
    reason: str = ""
