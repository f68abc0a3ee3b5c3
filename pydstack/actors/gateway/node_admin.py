"""A gateway node's admin HTTP endpoint: status, the table it serves, its device's peers, and
Prometheus metrics. Plain HTTP on a local or management address, read-only.

    GET /status    {"node_id", "table_digest", "device_peer_digest", "lag", "connected", ...}
    GET /table     the ClusterTable it serves (canonical JSON, with ``seq``)
    GET /peers     the WireGuard device's peers as read back (handshakes, counters)
    GET /metrics   Prometheus text format

``pydstack gateway status|routes|peers --node-url URL`` reads these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

if TYPE_CHECKING:
    from .node import GatewayNode

NODE: web.AppKey[GatewayNode] = web.AppKey("gateway_node")


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].status())


async def _table(request: web.Request) -> web.Response:
    body = msgspec.json.encode(request.app[NODE].table)
    return web.Response(body=body, content_type="application/json")


async def _peers(request: web.Request) -> web.Response:
    node = request.app[NODE]
    status = await node.device.status()
    peers = [
        {
            "public_key": p.public_key,
            "allowed_ips": list(p.allowed_ips),
            "endpoint": p.endpoint,
            "last_handshake": p.last_handshake,
            "rx_bytes": p.rx_bytes,
            "tx_bytes": p.tx_bytes,
        }
        for p in status.peers
    ]
    return web.json_response(
        {
            "node_id": node.config.node_id,
            "public_key": status.public_key,
            "listen_port": status.listen_port,
            "peers": peers,
        }
    )


async def _metrics(_request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest(REGISTRY))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def admin_app(node: GatewayNode) -> web.Application:
    app = web.Application()
    app[NODE] = node
    app.router.add_get("/status", _status)
    app.router.add_get("/table", _table)
    app.router.add_get("/peers", _peers)
    app.router.add_get("/metrics", _metrics)
    return app
