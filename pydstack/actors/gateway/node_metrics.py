"""Prometheus metrics of a gateway node, labelled by node id (defining them does no I/O).

``pydstack_gateway_table_info{node, digest, peer_digest, device_peer_digest}`` lets an
operator (or ``pydstack gateway status``) compare nodes without fetching their tables: equal
digests, equal tables; ``peer_digest == device_peer_digest``, the device holds the table.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Info

LAG: Final = Gauge(
    "pydstack_gateway_lag", "Stream messages not yet folded by the gateway node.", ["node"]
)
SEQ: Final = Gauge("pydstack_gateway_seq", "Stream sequence the node has folded.", ["node"])
CONNECTED: Final = Gauge(
    "pydstack_gateway_connected", "1 while the node can read the log, 0 when cut off.", ["node"]
)
PEERS: Final = Gauge("pydstack_gateway_peers", "WireGuard peers the table wants.", ["node"])
ROUTES: Final = Gauge("pydstack_gateway_routes", "Routed instances in the table.", ["node"])
RECONCILES: Final = Counter(
    "pydstack_gateway_reconciles", "Reconciles that changed the device or proxy.", ["node"]
)
TABLE: Final = Info(
    "pydstack_gateway_table", "Digests of the table and peer set the node serves.", ["node"]
)
