"""A test LAN of network namespaces: one bridge, a veth per member, and the host on it.

Names and subnets are random per run. While it exists the host namespace has an
``unreachable`` route for the whole ``10.A.0.0/16`` (underlay ``10.A.0.0/24``, tunnel
``10.A.8.0/21``: CVMs in the lower /22, nodes in ``10.A.15.x``), so nothing sent to a
tunnel address can leave the machine; the host reaches the underlay through its own veth
(more specific than the unreachable route), which is how nats-server (listening on the
host's LAN address) and the nodes' admin endpoints are reached.

    async with namespace_lan() as lan:
        ip = await lan.add("gw1")          # namespace lan.ns("gw1"), address ip on the bridge
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydstack.adapters.sandbox import _netns
from pydstack.adapters.wireguard import netns as ns


async def ip(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {err.decode().strip()}")


@dataclass
class Lan:
    tag: str
    a: int  # everything lives in 10.a.0.0/16
    members: dict[str, str] = field(default_factory=dict)  # name -> underlay address

    @property
    def bridge_ns(self) -> str:
        return f"pgl{self.tag}"

    @property
    def host_if(self) -> str:
        return f"pgh{self.tag}"

    @property
    def host_ip(self) -> str:
        return f"10.{self.a}.0.1"

    @property
    def tunnel_net(self) -> str:
        return f"10.{self.a}.8.0/21"

    @property
    def client_range(self) -> str:
        return f"10.{self.a}.8.0/22"

    def node_ip(self, n: int) -> str:
        return f"10.{self.a}.15.{200 + n}"

    def ns(self, name: str) -> str:
        return f"pg{self.tag}{name}"

    async def add(self, name: str) -> str:
        """A member namespace on the bridge; returns its underlay address."""
        addr = f"10.{self.a}.0.{10 + len(self.members)}"
        side = f"v{len(self.members)}"
        self.members[name] = addr  # reserved before any await: concurrent adds differ
        member = self.ns(name)
        await ns.create_netns(member)
        await ip("-n", self.bridge_ns, "link", "add", side, "type", "veth", "peer", "name",
                 "eth0", "netns", member)  # fmt: skip
        await ip("-n", self.bridge_ns, "link", "set", side, "master", "br0", "up")
        await ip("-n", member, "addr", "add", f"{addr}/24", "dev", "eth0")
        await ip("-n", member, "link", "set", "eth0", "up")
        return addr


@contextlib.asynccontextmanager
async def namespace_lan() -> AsyncIterator[Lan]:
    tag = secrets.token_hex(2)
    # A subnet no link of the host uses (a LAN left by a killed run keeps its address).
    free = [a for a in range(200, 250) if not await ns.addresses_in(None, f"10.{a}.0.0/16")]
    a = free[secrets.randbelow(len(free))]
    lan = Lan(tag, a)
    guard = f"10.{a}.0.0/16"
    await ns.add_unreachable_route(None, guard)
    try:
        await ns.create_netns(lan.bridge_ns)
        await ip("-n", lan.bridge_ns, "link", "add", "br0", "type", "bridge")
        await ip("-n", lan.bridge_ns, "link", "set", "br0", "up")
        await ip("link", "add", lan.host_if, "type", "veth", "peer", "name", "vh",
                 "netns", lan.bridge_ns)  # fmt: skip
        await ip("-n", lan.bridge_ns, "link", "set", "vh", "master", "br0", "up")
        await ip("addr", "add", f"{lan.host_ip}/24", "dev", lan.host_if)
        await ip("link", "set", lan.host_if, "up")
        yield lan
    finally:
        with contextlib.suppress(Exception):
            await ns.delete_link(None, lan.host_if)
        for name in list(lan.members):
            # What a test left running in the namespace (a gateway killed with -9 leaves its
            # wireguard-go; a process stopped too late) would outlive it, orphaned.
            await asyncio.to_thread(_netns.kill_all, lan.ns(name))
            with contextlib.suppress(Exception):
                await ns.delete_netns(lan.ns(name))
        with contextlib.suppress(Exception):
            await ns.delete_netns(lan.bridge_ns)
        await ns.delete_route(None, guard, unreachable=True)
