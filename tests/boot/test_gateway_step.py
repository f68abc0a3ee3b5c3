"""The boot's gateway step without a gateway: when it applies, how it fails, and the sandbox's
UDP relay that carries WireGuard out of a CVM's namespace (plain sockets, no root)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pydstack.actors.gateway.up_launch import dev_ca
from pydstack.adapters.ports import free_port
from pydstack.adapters.sandbox._outbound import HostRelay, split_endpoint
from pydstack.adapters.tdx.backend import SimulatorBackend
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
from pydstack.adapters.wireguard import UserspaceBackend
from pydstack_guest import GuestAgent, GuestConfig, create_dev_app_keys
from pydstack_guest.boot import BootFailed, BootPlan, HostShared, plan_boot
from pydstack_guest.gateway_setup import gateway_urls, setup_gateway

GW = {"gateway_urls": ["https://127.0.0.1:1"], "gateway_ca": "x"}


def plan(compose: dict[str, object], sys_config: dict[str, object]) -> BootPlan:
    return plan_boot(HostShared(app_compose=json.dumps(compose).encode(),
                                sys_config=json.dumps(sys_config).encode()))  # fmt: skip


@pytest.mark.parametrize(
    ("compose", "sysc", "want"),
    [
        ({"gateway_enabled": True}, GW, ("https://127.0.0.1:1",)),
        ({"tproxy_enabled": True}, GW, ("https://127.0.0.1:1",)),  # dstack's older name
        ({}, GW, ()),  # dstack's default: off
        ({"gateway_enabled": False}, GW, ()),
        ({"gateway_enabled": True}, {}, ()),  # the host runs no gateway (up --no-gateway)
    ],
)
def test_gateway_step_applies_when_the_app_enables_it_and_the_host_names_one(
    compose: dict[str, object], sysc: dict[str, object], want: tuple[str, ...]
) -> None:
    assert gateway_urls(plan(compose, sysc)) == want


def _agent(app_id: bytes) -> GuestAgent:
    keys, _ = create_dev_app_keys(app_id, now=0)
    backend = SimulatorBackend(QuoteSimulator(DevPki.generate()),
                               TdMeasurements(mr_td=hashlib.sha384(b"td").digest()))  # fmt: skip
    return GuestAgent(backend, keys, GuestConfig(app_name="t"))


async def test_an_unreachable_gateway_is_a_boot_error_at_gateway() -> None:
    """Registration fails on every URL: one BootFailed naming the step and the URL, and no
    WireGuard device is created (the backend's run dir stays empty)."""
    port = free_port()  # nothing listens there
    p = plan({"gateway_enabled": True},
             {"gateway_urls": [f"https://127.0.0.1:{port}"], "gateway_ca": _ca_pem()})  # fmt: skip
    seen: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(BootFailed) as e:
            await setup_gateway(_agent(p.app_id), p, wg=UserspaceBackend(Path(d) / "wg"),
                                report=lambda s, t: seen.append((s, t)))  # fmt: skip
        assert not (Path(d) / "wg").exists()
    assert e.value.step == "gateway"
    assert str(e.value).startswith(f"boot error at gateway: gateway https://127.0.0.1:{port}")
    assert seen == []


async def test_gateway_urls_without_a_ca_to_trust_are_refused() -> None:
    p = plan({"gateway_enabled": True}, {"gateway_urls": ["https://127.0.0.1:1"]})
    with pytest.raises(BootFailed, match="no gateway_ca"):
        await setup_gateway(_agent(p.app_id), p, wg=UserspaceBackend(Path("/nonexistent")),
                            report=lambda s, t: None)  # fmt: skip


def _ca_pem() -> str:
    with tempfile.TemporaryDirectory() as d:
        cert, _ = dev_ca(Path(d))
    return cert.public_bytes(Encoding.PEM).decode()


def test_split_endpoint() -> None:
    assert split_endpoint("127.0.0.1:51820") == ("127.0.0.1", 51820)
    assert split_endpoint("[::1]:51820") == ("::1", 51820)
    with pytest.raises(ValueError, match="not host:port"):
        split_endpoint("127.0.0.1")


async def test_udp_relay_carries_datagrams_both_ways_from_one_host_socket() -> None:
    """Datagrams sent to the relay's inside address reach the endpoint from one host-side
    port, and its replies come back to the sender."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[bytes, tuple[str, int]]] = []

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            seen.append((data, addr))
            self.t.sendto(b"re:" + data, addr)  # type: ignore[attr-defined]

    echo_t, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    port = echo_t.get_extra_info("sockname")[1]
    with tempfile.TemporaryDirectory() as d:
        relay = HostRelay.start([], str(Path(d) / "r"))
        inside = await relay.udp(f"127.0.0.1:{port}")
        host, _, iport = inside.rpartition(":")
        assert host == "127.0.0.1" and int(iport) != port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            for msg in (b"one", b"two"):
                c.sendto(msg, (host, int(iport)))
                data = await asyncio.to_thread(c.recv, 100)
                assert data == b"re:" + msg
        relay.close_udp()
    echo_t.close()
    assert [m for m, _ in seen] == [b"one", b"two"]
    assert len({a for _, a in seen}) == 1  # one endpoint per CVM, as the gateway sees it
