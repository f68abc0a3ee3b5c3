"""Test topology: two fresh namespaces joined by a veth pair, host routes made unreachable.

Names and subnets are random per run, so parallel runs do not collide. While a topology
exists, the host namespace has an ``unreachable`` route for its whole /24, so nothing a
test sends to a test address can leave the machine through the default route.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydstack.adapters.wireguard import netns as ns


@dataclass(frozen=True)
class Topology:
    ns_a: str
    ns_b: str
    subnet: str  # the /24 every address below lives in
    underlay_a: str  # veth addresses (WireGuard endpoints)
    underlay_b: str
    tunnel_a: str  # tunnel addresses (inside WireGuard)
    tunnel_b: str
    tunnel_c: str  # a third tunnel address for a peer that is never up

    def ns_prefix(self) -> str:
        return self.ns_a[:-1]


@contextlib.asynccontextmanager
async def two_namespaces() -> AsyncIterator[Topology]:
    tag = secrets.token_hex(3)
    octet2, octet3 = 200 + secrets.randbelow(50), secrets.randbelow(256)
    base = f"10.{octet2}.{octet3}"
    topo = Topology(
        ns_a=f"pdwg{tag}a",
        ns_b=f"pdwg{tag}b",
        subnet=f"{base}.0/24",
        underlay_a=f"{base}.1",
        underlay_b=f"{base}.2",
        tunnel_a=f"{base}.65",
        tunnel_b=f"{base}.66",
        tunnel_c=f"{base}.67",
    )
    await ns.add_unreachable_route(None, topo.subnet)
    try:
        async with ns.temporary_netns(topo.ns_a), ns.temporary_netns(topo.ns_b):
            await ns.add_veth(topo.ns_a, "ve-a", topo.ns_b, "ve-b")
            await ns.add_address(topo.ns_a, "ve-a", f"{topo.underlay_a}/28")
            await ns.add_address(topo.ns_b, "ve-b", f"{topo.underlay_b}/28")
            yield topo
    finally:
        await ns.delete_route(None, topo.subnet, unreachable=True)


async def echo_server(netns: str, host: str, port: int) -> asyncio.Server:
    """A TCP server inside ``netns`` that answers every read with its reverse."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data[::-1])
                await writer.drain()
        writer.close()

    sock = ns.socket_in_netns(netns)
    sock.setsockopt(1, 2, 1)  # SO_REUSEADDR
    sock.bind((host, port))
    sock.listen()
    sock.setblocking(False)
    return await asyncio.start_server(handle, sock=sock)


async def roundtrip(netns: str, host: str, port: int, payload: bytes, timeout: float = 5) -> bytes:
    """Connect from inside ``netns`` and return what the echo server answers."""
    sock = ns.socket_in_netns(netns)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        try:
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(payload)
            await writer.drain()
            return await reader.readexactly(len(payload))
        finally:
            writer.close()
