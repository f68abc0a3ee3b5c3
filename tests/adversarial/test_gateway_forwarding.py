"""Every CVM is a WireGuard peer of the gateway's interface. With ``ip_forward`` on in the
gateway's namespace (docker turns it on, so do routers), what a CVM sends to another CVM's
tunnel address was forwarded from the interface back into it: a CVM reached another tenant's
CVM, past the gateway's port policy, on any port. The node now drops, in the forward hook,
whatever arrives on or would leave by its interface (nftables, in its own namespace).

Whole topology in namespaces this test makes (tests/gateway_nodes' LAN): a real gateway node
process, two CVMs with their own wireguard-go. The attacker widens its own tunnel to the whole
tunnel network, and so does the victim (its app may: the gateway must not depend on it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import threading

import pytest

from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.wireguard import PeerConfig, UserspaceBackend
from pydstack.adapters.wireguard import netns as ns
from pydstack_guest.gateway_client import await_handshake
from tests.gateway.simcvm import DevCa
from tests.gateway_nodes.conftest import BASE, Cluster, cluster
from tests.gateway_nodes.cvms import Cvm, fetch
from tests.gateway_nodes.procs import wait_identical
from tests.gateway_nodes.test_routes import _new_cvm, _write_files, eventually
from tests.proxy.support import Pki

__all__ = ["cluster"]  # the gateway nodes' LAN fixture


async def _in(netns: str, *argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={ns.netns_path(netns)}", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


async def _http(netns: str, ip: str, port: int = 80, timeout: float = 3.0) -> bytes:
    """An HTTP GET from inside `netns` straight to `ip` (no gateway proxy involved)."""
    sock = ns.socket_in_netns(netns)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (ip, port))
            await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return await loop.sock_recv(sock, 4096)
    finally:
        sock.close()


def _ping(netns: str, ip: str, timeout: float = 2.0) -> bool:
    """One ICMP echo from inside `netns` (a raw socket made there); True when answered."""
    out: list[bool | BaseException] = []

    def run() -> None:
        try:
            import ctypes

            fd = os.open(ns.netns_path(netns), os.O_RDONLY)
            try:
                assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0
            finally:
                os.close(fd)
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
                s.settimeout(timeout)
                ident = os.getpid() & 0xFFFF
                head = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
                body = b"pydstack forwarding test"
                total = sum(struct.unpack(f"!{len(head + body) // 2}H", head + body))
                total = (total >> 16) + (total & 0xFFFF)
                csum = ~(total + (total >> 16)) & 0xFFFF
                s.sendto(struct.pack("!BBHHH", 8, 0, csum, ident, 1) + body, (ip, 0))
                while True:
                    data, src = s.recvfrom(2048)
                    icmp = data[(data[0] & 0x0F) * 4 :]
                    if src[0] == ip and icmp[0] == 0 and icmp[4:6] == struct.pack("!H", ident):
                        out.append(True)
                        return
        except TimeoutError:
            out.append(False)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


async def _widen(cvm: Cvm, tunnel_net: str) -> None:
    """What a CVM's own code may do: accept and route the whole tunnel network via the
    gateway (its tunnel is its own; the registration gave it the node's /32)."""
    assert cvm.device is not None and cvm.reg is not None
    await cvm.device.sync_peers(
        PeerConfig(public_key=s.public_key, allowed_ips=(tunnel_net,), endpoint=s.endpoint,
                   persistent_keepalive=5)
        for s in cvm.reg.servers
    )  # fmt: skip


@pytest.mark.timeout(150)
async def test_a_cvm_reaches_no_other_cvm_through_the_gateway(cluster: Cluster) -> None:
    """With ip_forward on in the gateway's namespace, the attacker CVM's ping and HTTP to the
    victim's tunnel address get nothing (the guard's counter shows the drops), while the
    gateway still routes the victim's app URL. Control: without the node's table the same
    ping and request get through (what happened before)."""
    pki, ca, dev = Pki.create("gateway test CA"), DevCa.create(), DevPki.generate()
    cluster.files = _write_files(cluster.tmp, pki, ca, dev)
    gw = await cluster.node(1)
    client = cluster.lan.ns("client")
    await cluster.lan.add("client")
    backend = UserspaceBackend(cluster.tmp / "cvm-wg")
    attacker = await _new_cvm(cluster, "cvm1", dev, pki)
    victim = await _new_cvm(cluster, "cvm3", dev, pki)  # another app (tests' APPS table)
    try:
        for c in (attacker, victim):
            await c.register(gw.registration_url, ca, backend, prefix=21)
            assert c.device is not None and c.reg is not None
            assert await await_handshake(c.device, c.reg) is not None
        await wait_identical([gw], min_peers=2)
        body, _ = await eventually(
            lambda: fetch(client, gw.address, f"{victim.instance_id}.{BASE}", pki.pem.decode())
        )
        assert body == b"cvm3|80"  # the gateway's own route to the victim works
        await _in(gw.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for c in (attacker, victim):
            await _widen(c, cluster.lan.tunnel_net)
        assert victim.reg is not None
        target = victim.reg.client_ip

        assert not await asyncio.to_thread(_ping, attacker.netns, target)
        with pytest.raises((TimeoutError, OSError)):
            await _http(attacker.netns, target)
        listed = await _in(gw.netns, "nft", "list", "table", "inet", "pydstack_gw_dgw0")
        dropped = re.search(r'iifname "dgw0" counter packets (\d+)', listed)
        assert dropped and int(dropped[1]) > 0, listed

        # Control: the node's table removed, the same packets are forwarded.
        await _in(gw.netns, "nft", "delete", "table", "inet", "pydstack_gw_dgw0")
        assert await asyncio.to_thread(_ping, attacker.netns, target)
        assert (await _http(attacker.netns, target)).endswith(b"cvm3|80")
    finally:
        for c in (attacker, victim):
            with contextlib.suppress(Exception):
                await c.close()
