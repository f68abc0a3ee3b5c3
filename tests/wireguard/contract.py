"""The WireGuard port contract: every backend must pass these against real devices.

Subclasses provide the ``backend`` fixture (skipping with the backend's own reason when it
cannot run here). Each test builds two fresh namespaces joined by veth; all traffic stays
inside them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from pydstack.adapters.wireguard import (
    DeviceConfig,
    PeerConfig,
    PrivateKey,
    WireGuardBackend,
    WireGuardDevice,
    WireGuardError,
)

from .topology import Topology, echo_server, roundtrip, two_namespaces

PORT = 51820
ECHO = 7000


class Pair:
    """Two configured devices, A and B, that are each other's peer."""

    def __init__(self, topo: Topology, a: WireGuardDevice, b: WireGuardDevice) -> None:
        self.topo, self.a, self.b = topo, a, b
        self.key_a, self.key_b = PrivateKey.generate(), PrivateKey.generate()

    @property
    def peer_b(self) -> PeerConfig:
        """B as A sees it: a fixed endpoint, keepalive so the session stays warm."""
        t = self.topo
        return PeerConfig(
            self.key_b.public_key().b64, (f"{t.tunnel_b}/32",), f"{t.underlay_b}:{PORT}", 0
        )

    @property
    def peer_a(self) -> PeerConfig:
        """A as B sees it: no endpoint (learned when A talks first), like a gateway's CVM."""
        return PeerConfig(self.key_a.public_key().b64, (f"{self.topo.tunnel_a}/32",))

    async def setup(self) -> None:
        t = self.topo
        await self.a.configure(DeviceConfig(self.key_a, PORT))
        await self.b.configure(DeviceConfig(self.key_b, PORT))
        await self.a.set_address(f"{t.tunnel_a}/26")
        await self.b.set_address(f"{t.tunnel_b}/26")
        await self.a.sync_peers([self.peer_b])
        await self.b.sync_peers([self.peer_a])


def other_peer(ip: str) -> PeerConfig:
    return PeerConfig(PrivateKey.generate().public_key().b64, (f"{ip}/32",))


class WireGuardContract:
    """Behaviour every WireGuard backend must show."""

    @pytest.fixture
    async def topo(self) -> AsyncIterator[Topology]:
        async with two_namespaces() as topo:
            yield topo

    @pytest.fixture
    async def pair(self, backend: WireGuardBackend, topo: Topology) -> AsyncIterator[Pair]:
        async with (
            await backend.create("wg0", topo.ns_a) as a,
            await backend.create("wg0", topo.ns_b) as b,
        ):
            pair = Pair(topo, a, b)
            await pair.setup()
            yield pair

    @pytest.fixture
    async def echo_b(self, pair: Pair) -> AsyncIterator[asyncio.Server]:
        server = await echo_server(pair.topo.ns_b, pair.topo.tunnel_b, ECHO)
        yield server
        server.close()

    async def test_configure_sets_key_and_port_once(self, pair: Pair) -> None:
        """configure() installs the key and port; repeating it changes nothing."""
        status = await pair.a.status()
        assert status.public_key == pair.key_a.public_key().b64
        assert status.listen_port == PORT
        assert await pair.a.configure(DeviceConfig(pair.key_a, PORT)) is False
        new_key = PrivateKey.generate()
        assert await pair.a.configure(DeviceConfig(new_key, PORT)) is True
        assert (await pair.a.status()).public_key == new_key.public_key().b64

    async def test_same_interface_name_in_two_namespaces(self, pair: Pair) -> None:
        """Both namespaces run a device called wg0, each with its own key."""
        a, b = await pair.a.status(), await pair.b.status()
        assert (pair.a.ifname, pair.b.ifname) == ("wg0", "wg0")
        assert a.public_key != b.public_key

    async def test_peers_read_back_as_configured(self, pair: Pair) -> None:
        """Peers set through sync_peers come back from status() field for field."""
        t = pair.topo
        desired = [
            pair.peer_b,
            other_peer(t.tunnel_c),
            PeerConfig(
                PrivateKey.generate().public_key().b64,
                ("10.99.0.0/16", "fd00::/64"),
                "10.1.2.3:4000",
                25,
            ),
        ]
        await pair.a.sync_peers(desired)
        got = sorted((p.config for p in (await pair.a.status()).peers), key=lambda p: p.public_key)
        assert got == sorted(desired, key=lambda p: p.public_key)

    async def test_tunnel_carries_tcp_between_namespaces(self, pair: Pair, echo_b: object) -> None:
        """A TCP exchange from A's namespace reaches B's tunnel address through WireGuard."""
        payload = b"through the tunnel" * 100
        assert await roundtrip(pair.topo.ns_a, pair.topo.tunnel_b, ECHO, payload) == payload[::-1]

    async def test_stats_after_traffic(self, pair: Pair, echo_b: object) -> None:
        """After traffic both sides report a recent handshake, rx/tx, and B learned A's endpoint."""
        before = time.time()
        await roundtrip(pair.topo.ns_a, pair.topo.tunnel_b, ECHO, b"x" * 5000)
        a_view = (await pair.a.status()).peer(pair.peer_b.public_key)
        b_view = (await pair.b.status()).peer(pair.peer_a.public_key)
        assert a_view is not None and b_view is not None
        for view in (a_view, b_view):
            assert view.last_handshake is not None
            assert before - 1 <= view.last_handshake <= time.time() + 1
            assert view.rx_bytes > 0 and view.tx_bytes > 0
        assert a_view.tx_bytes >= 5000 and b_view.rx_bytes >= 5000
        assert b_view.endpoint == f"{pair.topo.underlay_a}:{PORT}"

    async def test_diff_leaves_unchanged_peers_alone(self, pair: Pair, echo_b: object) -> None:
        """Adding, changing and removing other peers keeps B's session and counters on A."""
        t = pair.topo
        await roundtrip(t.ns_a, t.tunnel_b, ECHO, b"warm up")
        changing, leaving = other_peer("10.98.0.1"), other_peer("10.98.0.2")
        await pair.a.sync_peers([pair.peer_b, changing, leaving])
        before = (await pair.a.status()).peer(pair.peer_b.public_key)
        assert before is not None and before.last_handshake is not None
        changed = PeerConfig(changing.public_key, ("10.98.1.0/24",), None, 15)
        ops = await pair.a.sync_peers([pair.peer_b, changed, other_peer(t.tunnel_c)])
        assert pair.peer_b.public_key not in {op.public_key for op in ops}
        assert len(ops) == 3
        after = (await pair.a.status()).peer(pair.peer_b.public_key)
        assert after is not None
        assert after.last_handshake == before.last_handshake
        assert after.rx_bytes >= before.rx_bytes > 0 and after.tx_bytes >= before.tx_bytes > 0
        status = await pair.a.status()
        assert status.peer(leaving.public_key) is None
        assert status.peer(changed.public_key) is not None
        assert status.peer(changed.public_key).config == changed  # type: ignore[union-attr]
        assert await roundtrip(t.ns_a, t.tunnel_b, ECHO, b"still up") == b"pu llits"

    async def test_readding_a_peer_resets_its_session(self, pair: Pair, echo_b: object) -> None:
        """Why the diff matters: remove + add of the same peer loses its handshake and counters."""
        t = pair.topo
        await roundtrip(t.ns_a, t.tunnel_b, ECHO, b"warm up")
        await pair.a.remove_peers([pair.peer_b.public_key])
        await pair.a.sync_peers([pair.peer_b])
        view = (await pair.a.status()).peer(pair.peer_b.public_key)
        assert view is not None
        assert view.last_handshake is None and view.rx_bytes == 0

    async def test_sync_with_nothing_to_do_sends_nothing(self, pair: Pair) -> None:
        """A second sync with the same desired peers returns no operations."""
        assert await pair.a.sync_peers([pair.peer_b]) == ()

    async def test_removed_peer_gets_no_traffic(self, pair: Pair, echo_b: object) -> None:
        """After B is removed from A, A can no longer reach B's tunnel address."""
        t = pair.topo
        await roundtrip(t.ns_a, t.tunnel_b, ECHO, b"before")
        await pair.a.sync_peers([])
        assert (await pair.a.status()).peers == ()
        with pytest.raises((TimeoutError, OSError)):
            await roundtrip(t.ns_a, t.tunnel_b, ECHO, b"after", timeout=1.5)

    async def test_allowed_ips_change_moves_routing(self, pair: Pair, echo_b: object) -> None:
        """Dropping B's tunnel address from its allowed IPs stops traffic; restoring it heals."""
        t = pair.topo
        narrowed = PeerConfig(pair.peer_b.public_key, (f"{t.tunnel_c}/32",), pair.peer_b.endpoint)
        (op,) = await pair.a.sync_peers([narrowed])
        assert op.update_only and op.replace_allowed_ips and op.allowed_ips == (f"{t.tunnel_c}/32",)
        with pytest.raises((TimeoutError, OSError)):
            await roundtrip(t.ns_a, t.tunnel_b, ECHO, b"blocked", timeout=1.5)
        await pair.a.sync_peers([pair.peer_b])
        assert await roundtrip(t.ns_a, t.tunnel_b, ECHO, b"healed") == b"delaeh"

    async def test_port_conflict_is_a_wireguard_error(
        self, backend: WireGuardBackend, pair: Pair
    ) -> None:
        """A second device in A's namespace cannot take A's UDP port: a typed error, not a crash."""
        async with await backend.create("wg1", pair.topo.ns_a) as extra:
            await extra.up()
            with pytest.raises(WireGuardError):
                await extra.configure(DeviceConfig(PrivateKey.generate(), PORT))
            assert (await pair.a.status()).listen_port == PORT
