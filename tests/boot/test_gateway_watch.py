"""The CVM's stale-tunnel check (dstack's wg-checker): a gateway that forgot the CVM (a new
key and port, no peer for it) gets no handshake within the bound, so the CVM registers again
and handshakes with the node it is given; real wireguard-go in a namespace of the test's own."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from pydstack.adapters.ports import free_port
from pydstack.adapters.wireguard import (
    DeviceConfig,
    PeerConfig,
    PrivateKey,
    UserspaceBackend,
    WireGuardDevice,
)
from pydstack_guest.gateway_client import GatewayServer, Registration, bring_up_tunnel
from pydstack_guest.gateway_setup import GatewayTunnel
from tests.netns import Netns

CVM_IP = "10.77.0.2"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("wireguard-go") is None,
    reason="needs root and wireguard-go",
)


async def _gateway(
    backend: UserspaceBackend, ns: str, ifname: str, cvm_key: str | None
) -> tuple[WireGuardDevice, Registration]:
    """A gateway stand-in: its own key and port, the CVM as a peer when ``cvm_key`` (what a
    registration does); and the registration it would answer."""
    key, port = PrivateKey.generate(), free_port()
    dev = await backend.create(ifname, ns)
    await dev.configure(DeviceConfig(private_key=key, listen_port=port))
    if cvm_key is not None:
        await dev.sync_peers([PeerConfig(public_key=cvm_key, allowed_ips=(f"{CVM_IP}/32",))])
    server = GatewayServer(key.public_key().b64, "10.77.0.1", f"127.0.0.1:{port}")
    return dev, Registration(CVM_IP, (server,), "gw.test", {})


async def _await_handshake(dev: WireGuardDevice, key: str, timeout_s: float) -> None:
    """Until ``dev`` handshook with ``key`` (TimeoutError at the bound)."""
    async with asyncio.timeout(timeout_s):
        while True:
            peer = (await dev.status()).peer(key)
            if peer is not None and peer.last_handshake:
                return
            await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_a_cvm_forgotten_by_its_gateway_registers_again_and_handshakes(
    tmp_path: Path,
) -> None:
    """Handshake with gateway A; A is replaced by B (new key and port, no peer for the CVM):
    within the bound (2 s here) plus a check the CVM registers again (once) and its tunnel
    handshakes with B, on the same tunnel address."""
    backend = UserspaceBackend(Path(f"/tmp/pdw-{os.getpid()}"))
    cvm_key = PrivateKey.generate()
    with Netns.create("gwwatch") as ns:
        gw_a, reg_a = await _gateway(backend, ns.name, "gwa", cvm_key.public_key().b64)
        device = await bring_up_tunnel(backend, "wg0", cvm_key, reg_a, netns=ns.name)
        tunnel = GatewayTunnel(reg_a, "https://a", device)
        gw_b: WireGuardDevice | None = None
        try:
            await _await_handshake(gw_a, cvm_key.public_key().b64, 10)
            await gw_a.close()  # the gateway is gone; its replacement forgot the CVM
            gw_b, reg_b = await _gateway(backend, ns.name, "gwb", None)
            calls: list[str] = []

            async def reregister() -> tuple[str, Registration]:
                calls.append("b")
                assert gw_b is not None
                await gw_b.sync_peers(
                    [PeerConfig(public_key=cvm_key.public_key().b64, allowed_ips=(f"{CVM_IP}/32",))]
                )
                return "https://b", reg_b

            tunnel.watch(reregister, stale_s=2.0, check_s=0.2)
            await _await_handshake(gw_b, cvm_key.public_key().b64, 20)
            assert calls == ["b"]
            assert (tunnel.url, tunnel.reregistrations) == ("https://b", 1)
            assert tunnel.registration.client_ip == CVM_IP
        finally:
            await tunnel.close()
            if gw_b is not None:
                await gw_b.close()
            shutil.rmtree(backend.run_dir, ignore_errors=True)
