"""One client cannot exhaust the gateway host's file descriptors by spreading connections over
many apps: past ``max_connections`` (all apps together) the built-in proxy resets a new
connection at accept, before reading a byte, counts it and logs it at most once per interval;
the connections it holds keep working, and a slot frees when one closes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from pydstack.adapters.proxy import ProxyConfig, ProxyServer, StaticCertProvider
from pydstack.core.gateway import Instance, RoutingTable
from tests.proxy.support import Backend, Pki, client_hello, random_loopback, start_backend

BASE = "cap.example.test"
CAP = 4
APPS = ("appa", "appb", "appc", "appd", "appe")

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, Backend]]:
    out: dict[str, Backend] = {}
    port = 0
    for app in APPS:
        out[app] = await start_backend(app, random_loopback(), port)
        port = out[app].port  # one port for all: names are <app>-<port>
    yield out
    for b in out.values():
        b.close()


async def _open(proxy: ProxyServer, pki: Pki, name: str) -> Conn:
    return await asyncio.open_connection("127.0.0.1", proxy.port, ssl=pki.client_context(),
                                         server_hostname=name)  # fmt: skip


async def _ask(conn: Conn, payload: bytes) -> bytes:
    reader, writer = conn
    writer.write(payload)
    await writer.drain()
    async with asyncio.timeout(5):
        return await reader.read(1024)


async def _closed_at_once(proxy: ProxyServer, name: str) -> bool:
    """A raw connection sending a ClientHello for ``name``: closed with nothing answered within
    a second (the proxy's handshake timeout is 30 s, so only an accept-time refusal is this
    quick)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    except ConnectionResetError:  # reset before the connect call even returned
        return True
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(client_hello(name))
            await writer.drain()
        try:
            async with asyncio.timeout(1):
                return await reader.read(1024) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    finally:
        writer.close()


async def test_connections_over_the_global_cap_are_refused_at_accept(
    backends: dict[str, Backend],
) -> None:
    pki = Pki.create("cap test CA")
    port = backends["appa"].port
    table = RoutingTable.build([Instance(f"{a}1", a, b.ip, time.time())
                                for a, b in backends.items()], [BASE])  # fmt: skip
    config = ProxyConfig(port=0, max_connections=CAP, handshake_timeout=30.0,
                         limit_log_interval=60.0)  # fmt: skip
    proxy = await ProxyServer.create(config, StaticCertProvider({BASE: pki.issue(f"*.{BASE}")}),
                                     table)  # fmt: skip
    async with proxy:
        held: list[Conn] = []
        try:
            for app in ("appa", "appb", "appc", "appa"):  # the cap, spread over three apps
                held.append(await _open(proxy, pki, f"{app}-{port}.{BASE}"))
                assert await _ask(held[-1], b"ping") == f"{app}|ping".encode()
            assert proxy.stats.active == CAP
            with capture_logs() as logs:
                for app in ("appd", "appe", "appb"):  # new apps too: the cap is global
                    assert await _closed_at_once(proxy, f"{app}-{port}.{BASE}")
            assert proxy.stats.refused["global_limit"] == 3
            assert backends["appd"].received == backends["appe"].received == []
            limit_lines = [e for e in logs if e["event"].startswith("connection limit reached")]
            assert len(limit_lines) == 1 and limit_lines[0]["log_level"] == "warning"
            for conn, app in zip(held, ("appa", "appb", "appc", "appa"), strict=True):
                assert await _ask(conn, b"again") == f"{app}|again".encode()

            held.pop(1)[1].close()  # one closes: its slot frees
            for _ in range(100):
                if proxy.stats.active < CAP:
                    break
                await asyncio.sleep(0.02)
            held.append(await _open(proxy, pki, f"appd-{port}.{BASE}"))
            assert await _ask(held[-1], b"in") == b"appd|in"
            assert proxy.stats.refused["global_limit"] == 3
        finally:
            for _, w in held:
                w.close()


async def test_the_cap_defaults_to_ten_thousand_and_zero_means_none() -> None:
    assert ProxyConfig().max_connections == 10_000
    pki = Pki.create("cap test CA")
    certs = StaticCertProvider({BASE: pki.issue(f"*.{BASE}")})
    proxy = await ProxyServer.create(ProxyConfig(port=0, max_connections=0), certs)
    async with proxy:
        conns = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(20)]
        await asyncio.sleep(0.1)
        assert proxy.stats.refused["global_limit"] == 0 and proxy.stats.active == 20
        for _, w in conns:
            w.close()
