"""dstack's reserved gateway ids `health` and `gateway` (issue 16 item 7), answered by the
built-in proxy itself over real TLS sockets.

v0.5.11 `gateway/src/proxy/tls_terminate.rs`: on a terminated name, id `health` answers
`GET /` 200 (else 404); id `gateway` answers `GET /health` 200, `GET /index` and
`/.dstack/index` with the JSON below, a non-GET 405, else 404; both on port 80 only.
A passthrough name (`-s`) is no exception there: it is routed to an app of that id.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator

import pytest

from pydstack.adapters.proxy import ProxyConfig, ProxyServer, StaticCertProvider
from pydstack.adapters.proxy.reserved import MAX_HEAD
from pydstack.core.gateway import RoutingTable
from tests.proxy.support import Pki

BASE = "gw.example.test"
# dstack's literal (`handle_this_node`, "/index")
DSTACK_INDEX = {"type": "dstack gateway", "paths": ["/index", "/app-info", "/acme-info"]}


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ProxyServer, ssl.SSLContext]]:
    pki = Pki.create("gateway CA")
    certs = StaticCertProvider({BASE: pki.issue(f"*.{BASE}")})
    server = await ProxyServer.create(ProxyConfig(port=0), certs, RoutingTable.build([], [BASE]))
    async with server:
        yield server, pki.client_context()


async def _http(port: int, name: str, ctx: ssl.SSLContext, request: bytes) -> bytes:
    """What the proxy answers `request` on a TLS connection for `name`, up to its close."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=name
        )
        writer.write(request)
        await writer.drain()
        try:
            return await reader.read()
        finally:
            writer.close()


def _status_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.mark.parametrize(
    ("name", "request_line", "status", "body"),
    [
        (f"health.{BASE}", "GET / HTTP/1.1", 200, b""),
        (f"health-80.{BASE}", "GET / HTTP/1.1", 200, b""),
        (f"health.{BASE}", "GET /x HTTP/1.1", 404, b""),
        (f"health.{BASE}", "POST / HTTP/1.1", 404, b""),
        (f"gateway.{BASE}", "GET /health HTTP/1.1", 200, b""),
        (f"gateway.{BASE}", "GET /index HTTP/1.1", 200, DSTACK_INDEX),
        (f"gateway-80.{BASE}", "GET /.dstack/index?x=1 HTTP/1.1", 200, DSTACK_INDEX),
        (f"gateway.{BASE}", "POST /index HTTP/1.1", 405, b""),
        (f"gateway.{BASE}", "GET /nothing HTTP/1.1", 404, b""),
        (f"gateway.{BASE}", "nonsense", 400, b""),
    ],
)
async def test_reserved_ids_answer_as_dstacks_gateway(
    proxy: tuple[ProxyServer, ssl.SSLContext],
    name: str,
    request_line: str,
    status: int,
    body: bytes | dict[str, object],
) -> None:
    server, ctx = proxy
    raw = await _http(server.port, name, ctx, f"{request_line}\r\nHost: {name}\r\n\r\n".encode())
    got_status, got_body = _status_body(raw)
    assert got_status == status
    assert (json.loads(got_body) if isinstance(body, dict) else got_body) == body
    assert server.stats.routed["reserved"] == 1


@pytest.mark.parametrize("name", [f"gateway-443.{BASE}", f"health-8080.{BASE}"])
async def test_reserved_ids_only_on_port_80(
    proxy: tuple[ProxyServer, ssl.SSLContext], name: str
) -> None:
    """Another port is refused before TLS, as dstack's `Only port 80 is supported`."""
    server, ctx = proxy
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _http(server.port, name, ctx, b"GET / HTTP/1.1\r\n\r\n")
    assert server.stats.refused["bad_route"] == 1 and server.stats.routed["reserved"] == 0


async def test_oversize_request_head_is_closed_unanswered(
    proxy: tuple[ProxyServer, ssl.SSLContext],
) -> None:
    """A request head over MAX_HEAD bytes gets no answer, only a close."""
    server, ctx = proxy
    junk = b"GET /" + b"a" * (MAX_HEAD + 10) + b" HTTP/1.1\r\n\r\n"
    try:
        raw = await _http(server.port, f"gateway.{BASE}", ctx, junk)
    except (ConnectionError, ssl.SSLError):
        raw = b""
    assert raw == b""
