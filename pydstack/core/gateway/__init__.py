"""Pure gateway logic: ClientHello/SNI parsing, dstack's routing rules, backend selection.

Usage::

    hello = parse_client_hello(first_bytes)
    route = parse_route(hello.server_name or "", table.base_domains)
    picked = pick_backends(route, table, now)
"""

from .proxy_protocol import encode_proxy_header, encode_v1, encode_v2
from .routing import (
    HANDSHAKE_STALE_S,
    OPEN,
    TOP_N,
    Backend,
    Instance,
    PortPolicy,
    PortRule,
    Refusal,
    RefusalReason,
    RoutingTable,
    Selection,
    pick_backends,
)
from .sni import (
    ClientHello,
    ClientHelloError,
    IncompleteClientHello,
    MalformedClientHello,
    Mode,
    Route,
    RouteError,
    parse_app_address,
    parse_client_hello,
    parse_route,
)

__all__ = [
    "HANDSHAKE_STALE_S",
    "OPEN",
    "TOP_N",
    "Backend",
    "ClientHello",
    "ClientHelloError",
    "IncompleteClientHello",
    "Instance",
    "MalformedClientHello",
    "Mode",
    "PortPolicy",
    "PortRule",
    "Refusal",
    "RefusalReason",
    "Route",
    "RouteError",
    "RoutingTable",
    "Selection",
    "encode_proxy_header",
    "encode_v1",
    "encode_v2",
    "parse_app_address",
    "parse_client_hello",
    "parse_route",
    "pick_backends",
]
