"""The gateway data-plane contract: every data plane passes these against real TCP/TLS
backends on loopback. Every route shape reaches the right backend; bad input is refused
without disturbing other connections.

A subclass provides ``start_plane`` (a running plane behind a `Plane` handle). A plane
that differs by design lists the test in ``differs_by_design`` with the reason, and a
counter it does not keep answers None (the closing behaviour is still asserted).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from pydstack.core.gateway import Instance, PortPolicy, PortRule, RoutingTable

from .support import (
    Backend,
    Pki,
    backend_tls,
    client_hello,
    random_loopback,
    refused,
    start_backend,
    tls_request,
)

BASE = "app.example.test"


class Plane(abc.ABC):
    """What the contract needs from a running data plane."""

    port: int
    table: RoutingTable

    @abc.abstractmethod
    async def set_table(self, table: RoutingTable) -> None: ...

    @abc.abstractmethod
    async def set_app_limit(self, limit: int) -> None: ...

    @abc.abstractmethod
    async def refused(self, reason: str) -> int | None:
        """Connections refused for ``reason`` so far; None if this plane does not count it."""

    @abc.abstractmethod
    async def routed(self, mode: str) -> int:
        """Connections routed in ``mode`` (terminate, passthrough, h2) so far."""

    @abc.abstractmethod
    async def active(self, app: str) -> int: ...


@dataclass(frozen=True)
class PlaneSettings:
    handshake_timeout: float = 2.0
    connect_timeout: float = 2.0
    idle_timeout: float = 600.0
    custom_domains: Mapping[str, tuple[str, int]] = field(default_factory=dict)


async def assert_count(plane: Plane, reason: str, expected: int) -> None:
    got = await plane.refused(reason)
    if got is not None:
        assert got == expected, (reason, got)


@dataclass
class Env:
    pki: Pki  # the gateway's CA (wildcard certificate for BASE)
    app_pki: Pki  # the app's own CA (passthrough: only the app has this key)
    proxy: Plane
    a1: Backend  # instance a1 of app "appa" (fresh handshake)
    a2: Backend  # instance a2 of app "appa" (stale handshake)
    b1: Backend  # instance b1 of app "appb": plain
    t1: Backend  # instance t1 of app "appt": TLS backend with the app's certificate
    port: int  # the port every plain backend listens on
    certs: dict[str, tuple[bytes, bytes]]
    contract: ProxyContract

    def ctx(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        return self.pki.client_context(alpn)

    async def get(self, name: str, payload: bytes = b"ping", **kw: object) -> bytes:
        answer, _ = await tls_request(self.proxy.port, f"{name}.{BASE}", payload, self.ctx())
        return answer

    def start(
        self, table: RoutingTable, settings: PlaneSettings
    ) -> contextlib.AbstractAsyncContextManager[Plane]:
        return self.contract.start_plane(self.certs, table, settings)


def table_for(
    env_port: int, ips: dict[str, str], now: float, **policies: PortPolicy
) -> RoutingTable:
    def inst(iid: str, app: str, age: float | None) -> Instance:
        hs = None if age is None else now - age
        return Instance(iid, app, ips[iid], hs, policies.get(iid, PortPolicy()))

    return RoutingTable.build(
        [
            inst("a1", "appa", 5),
            inst("a2", "appa", 5000),
            inst("b1", "appb", 1),
            inst("t1", "appt", 1),
            inst("dead", "appd", 1),
        ],
        base_domains=[BASE],
    )


class ProxyContract(abc.ABC):
    differs_by_design: ClassVar[dict[str, str]] = {}

    @abc.abstractmethod
    def start_plane(
        self, certs: dict[str, tuple[bytes, bytes]], table: RoutingTable, settings: PlaneSettings
    ) -> contextlib.AbstractAsyncContextManager[Plane]: ...

    @pytest.fixture(autouse=True)
    def _design_skips(self, request: Any) -> None:
        reason = self.differs_by_design.get(request.node.originalname)
        if reason:
            pytest.skip(f"differs by design: {reason}")

    @pytest.fixture
    async def env(self) -> AsyncIterator[Env]:
        pki, app_pki = Pki.create("gateway test CA"), Pki.create("app test CA")
        ips = {k: random_loopback() for k in ("a1", "a2", "b1", "t1", "dead")}
        a1 = await start_backend("a1", ips["a1"])
        port = a1.port
        a2 = await start_backend("a2", ips["a2"], port)
        b1 = await start_backend("b1", ips["b1"], port)
        t1 = await start_backend(
            "t1",
            ips["t1"],
            port,
            tls=backend_tls(app_pki.issue(f"t1-{port}s.{BASE}", "shop.custom.test")),
        )
        certs = {BASE: pki.issue(f"*.{BASE}")}
        table = table_for(port, ips, time.time())
        async with self.start_plane(certs, table, PlaneSettings()) as proxy:
            yield Env(pki, app_pki, proxy, a1, a2, b1, t1, port, certs, self)
        for b in (a1, a2, b1, t1):
            b.close()

    async def test_terminate_by_instance_id_relays_plaintext(self, env: Env) -> None:
        """<instance>-<port>: TLS ends at the proxy (wildcard cert verifies), backend sees plain."""
        answer = await env.get(f"b1-{env.port}", b"hello")
        assert answer == b"b1|hello"
        assert env.b1.received == [b"hello"]
        assert await env.proxy.routed("terminate") == 1

    async def test_app_id_reaches_only_fresh_instances(self, env: Env) -> None:
        """<app>-<port>: every connection lands on the fresh instance, never the stale one."""
        answers = [await env.get(f"appa-{env.port}", b"x") for _ in range(5)]
        assert answers == [b"a1|x"] * 5 and env.a2.received == []

    async def test_instance_id_reaches_a_stale_instance(self, env: Env) -> None:
        """An instance id is direct: the stale instance a2 is still reachable by its own id."""
        assert await env.get(f"a2-{env.port}") == b"a2|ping"

    async def test_passthrough_keeps_tls_end_to_end(self, env: Env) -> None:
        """<id>-<port>s: the client completes TLS with the app's certificate, not the gateway's."""
        name = f"t1-{env.port}s.{BASE}"
        answer, _ = await tls_request(env.proxy.port, name, b"secret", env.app_pki.client_context())
        assert answer == b"t1|secret"
        assert env.t1.server_names == [name]
        with pytest.raises(ssl.SSLError):  # the gateway CA does not vouch for the app's cert
            await tls_request(env.proxy.port, name, b"x", env.ctx())

    async def test_g_suffix_negotiates_h2_and_relays_plaintext(self, env: Env) -> None:
        """<id>-<port>g: ALPN h2 is selected and the h2 preface reaches the backend in clear."""
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        answer, alpn = await tls_request(
            env.proxy.port, f"b1-{env.port}g.{BASE}", preface, env.ctx(["h2", "http/1.1"])
        )
        assert alpn == "h2" and answer == b"b1|" + preface
        _, plain_alpn = await tls_request(
            env.proxy.port, f"b1-{env.port}.{BASE}", b"x", env.ctx(["h2", "http/1.1"])
        )
        assert plain_alpn is None

    async def test_default_ports_follow_dstack(self, env: Env) -> None:
        """No port: termination goes to 80, passthrough (-s) to 443."""
        ip = random_loopback()
        table = RoutingTable.build([Instance("d1", "appx", ip, time.time())], [BASE])
        await env.proxy.set_table(table)
        web = await start_backend("web80", ip, 80)
        tls = await start_backend(
            "tls443", ip, 443, tls=backend_tls(env.app_pki.issue(f"*.{BASE}"))
        )
        try:
            assert await env.get("d1") == b"web80|ping"
            answer, _ = await tls_request(
                env.proxy.port, f"d1-s.{BASE}", b"q", env.app_pki.client_context()
            )
            assert answer == b"tls443|q"
        finally:
            web.close()
            tls.close()

    async def test_first_connect_wins_over_closed_ports(self, env: Env) -> None:
        """An app whose freshest instances refuse connections is still served by the live one."""
        now = time.time()
        live = env.b1
        table = RoutingTable.build(
            [
                Instance("x1", "race", random_loopback(), now - 1),
                Instance("x2", "race", random_loopback(), now - 2),
                Instance("x3", "race", live.ip, now - 3),
            ],
            [BASE],
        )
        await env.proxy.set_table(table)
        assert [await env.get(f"race-{env.port}", b"r") for _ in range(3)] == [b"b1|r"] * 3

    async def test_refusals_are_clean_and_specific(self, env: Env) -> None:
        """Garbage, no SNI, bad shapes, unknown ids/domains and closed ports each close only
        their own connection, with a distinct reason, and the proxy keeps serving."""
        port = env.proxy.port
        cases = {
            "malformed_client_hello": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "no_sni": client_hello(None),
            "bad_route": client_hello(f"b1-1-2.{BASE}"),
            "unknown_id": client_hello(f"nosuch-{env.port}.{BASE}"),
            "unknown_domain": client_hello("b1.elsewhere.test"),
            "connect_failed": client_hello(f"dead-{env.port}s.{BASE}"),
        }
        results = await asyncio.gather(*(refused(port, data) for data in cases.values()))
        assert all(results)
        for reason in cases:
            await assert_count(env.proxy, reason, 1)
        assert await env.get(f"b1-{env.port}", b"still") == b"b1|still"

    async def test_port_policy_refuses_and_sends_proxy_headers(self, env: Env) -> None:
        """Restrict mode refuses unlisted ports; listed ports get PROXY v1 or v2 first."""
        ips = {"v1": random_loopback(), "v2": random_loopback()}
        b_v1 = await start_backend("v1", ips["v1"], env.port)
        b_v2 = await start_backend("v2", ips["v2"], env.port)
        now = time.time()
        policy1 = PortPolicy(restrict=True, rules=(PortRule(env.port, proxy_protocol=1),))
        policy2 = PortPolicy(restrict=True, rules=(PortRule(env.port, proxy_protocol=2),))
        await env.proxy.set_table(
            RoutingTable.build(
                [
                    Instance("v1", "p1", ips["v1"], now, policy1),
                    Instance("v2", "p2", ips["v2"], now, policy2),
                ],
                [BASE],
            )
        )
        try:
            assert await refused(env.proxy.port, client_hello(f"v1-{env.port + 1}.{BASE}"))
            await assert_count(env.proxy, "port_denied", 1)
            answer = await env.get(f"v1-{env.port}", b"data")
            assert answer.startswith(b"v1|PROXY TCP4 127.0.0.1 127.0.0.1 ")
            header_v1 = b"".join(b_v1.received).split(b"\r\n")[0].decode().split()
            assert header_v1[:4] == ["PROXY", "TCP4", "127.0.0.1", "127.0.0.1"]
            assert int(header_v1[5]) == env.proxy.port
            await env.get(f"v2-{env.port}", b"data")
            seen = b"".join(b_v2.received)
            assert seen[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and seen[12:14] == b"\x21\x11"
            assert seen[16:20] == bytes([127, 0, 0, 1]) and seen.endswith(b"data")
            assert int.from_bytes(seen[26:28], "big") == env.proxy.port
        finally:
            b_v1.close()
            b_v2.close()

    async def test_per_app_connection_limit(self, env: Env) -> None:
        """With a limit of 2, a third concurrent connection to the app is refused, then freed."""
        hold = await start_backend("hold", random_loopback(), env.port, hold=True)
        await env.proxy.set_app_limit(2)
        await env.proxy.set_table(
            RoutingTable.build(
                [Instance("h1", "happ", hold.ip, time.time()), *env.proxy.table.instances.values()],
                [BASE],
            )
        )
        ctx = env.ctx()
        name = f"h1-{env.port}.{BASE}"
        held = [
            await asyncio.open_connection(
                "127.0.0.1", env.proxy.port, ssl=ctx, server_hostname=name
            )
            for _ in range(2)
        ]
        try:
            for _ in range(50):
                if hold.open_conns == 2:
                    break
                await asyncio.sleep(0.02)
            assert hold.open_conns == 2
            assert await refused(env.proxy.port, client_hello(name))
            await assert_count(env.proxy, "app_limit", 1)
            assert await env.get(f"b1-{env.port}") == b"b1|ping"  # other apps unaffected
            held.pop()[1].close()
            for _ in range(100):
                if await env.proxy.active("happ") < 2:
                    break
                await asyncio.sleep(0.02)
            third = await asyncio.open_connection(
                "127.0.0.1", env.proxy.port, ssl=ctx, server_hostname=name
            )
            held.append(third)
            await asyncio.sleep(0.1)
            await assert_count(env.proxy, "app_limit", 1)
            assert hold.open_conns == 2
        finally:
            for _, w in held:
                w.close()
            hold.close()

    async def test_idle_and_handshake_timeouts(self, env: Env) -> None:
        """A silent client is dropped after the handshake timeout, an idle relay after idle."""
        settings = PlaneSettings(handshake_timeout=0.3, idle_timeout=0.4)
        async with env.start(env.proxy.table, settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            t0 = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            assert 0.25 < time.monotonic() - t0 < 2
            await assert_count(proxy, "handshake_timeout", 1)
            writer.close()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.port, ssl=env.ctx(), server_hostname=f"b1-{env.port}.{BASE}"
            )
            writer.write(b"once")
            assert await reader.read(100) == b"b1|once"
            t0 = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert time.monotonic() - t0 >= 0.3
            await assert_count(proxy, "timeout", 1)
            writer.close()

    async def test_client_hello_in_pieces(self, env: Env) -> None:
        """A ClientHello arriving in three slow pieces is still routed (peek waits for more)."""
        hello = client_hello(f"dead-{env.port}s.{BASE}")
        reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
        for piece in (hello[:3], hello[3:60], hello[60:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        # it got as far as dialling (the instance's address has no listener)
        got = await env.proxy.refused("connect_failed")
        assert got == 1, got
        writer.close()

    async def test_table_swap_is_atomic(self, env: Env) -> None:
        """After set_table, new connections use the new table: added ids work, removed refuse."""
        new_ip = random_loopback()
        new = await start_backend("n1", new_ip, env.port)
        try:
            await env.proxy.set_table(
                RoutingTable.build([Instance("n1", "appn", new_ip, time.time())], [BASE])
            )
            assert await env.get(f"n1-{env.port}") == b"n1|ping"
            assert await refused(env.proxy.port, client_hello(f"b1-{env.port}.{BASE}"))
            await assert_count(env.proxy, "unknown_id", 1)
        finally:
            new.close()

    async def test_custom_domain_via_resolver(self, env: Env) -> None:
        """A name outside the base domains is resolved to (app, port) and passed through."""
        settings = PlaneSettings(custom_domains={"shop.custom.test": ("appt", env.port)})
        async with env.start(env.proxy.table, settings) as proxy:
            answer, _ = await tls_request(
                proxy.port, "shop.custom.test", b"x", env.app_pki.client_context()
            )
            assert answer == b"t1|x" and env.t1.server_names == ["shop.custom.test"]
            assert await refused(proxy.port, client_hello("other.custom.test"))
            await assert_count(proxy, "unknown_domain", 1)

    async def test_half_close_reaches_backend(self, env: Env) -> None:
        """Passthrough carries a TCP half-close: the backend sees EOF, answers, the client
        reads it."""
        ip = random_loopback()
        eof = await start_backend("eof", ip, env.port, read_until_eof=True)
        await env.proxy.set_table(
            RoutingTable.build([Instance("e1", "appe", ip, time.time())], [BASE])
        )
        try:
            hello = client_hello(f"e1-{env.port}s.{BASE}")
            reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
            writer.write(hello + b"request body")
            writer.write_eof()  # the backend only answers once it has seen EOF
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer == b"eof|" + hello + b"request body"
            writer.close()
        finally:
            eof.close()

    async def test_large_transfer_is_intact(self, env: Env) -> None:
        """8 MiB up and the echo back through TLS termination arrive byte-identical."""
        blob = bytes(range(256)) * (8 * 4096)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", env.proxy.port, ssl=env.ctx(), server_hostname=f"b1-{env.port}.{BASE}"
        )
        writer.write(blob)
        await writer.drain()
        got = bytearray()
        want = len(blob)
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
            got += chunk
            body = bytes(got).replace(b"b1|", b"")
            if len(body) >= want:
                break
        assert hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()
        writer.close()
