"""The WireGuard port: a device with a few verbs, and a backend that creates devices.

Every backend (userspace wireguard-go over UAPI, kernel over netlink) implements the two
abstract methods `status` and `_set`; the verbs on top are shared, so the diff logic and
the link setup are the same whatever carries the tunnel.

Usage::

    async with await backend.create("wg0", netns="gw1") as dev:
        await dev.configure(DeviceConfig(private_key=key, listen_port=51820))
        await dev.set_address("10.4.0.1/16")
        await dev.sync_peers([PeerConfig(public_key=pk, allowed_ips=("10.4.0.2/32",))])
        status = await dev.status()
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Self

from . import netns as _ns
from .diff import diff_device, diff_peers
from .keys import PrivateKey
from .model import DeviceConfig, DeviceStatus, PeerConfig, PeerOp


class WireGuardDevice(ABC):
    """One WireGuard interface in one network namespace (``None``: the host's)."""

    def __init__(self, ifname: str, netns: str | None) -> None:
        self.ifname = ifname
        self.netns = netns

    @abstractmethod
    async def status(self) -> DeviceStatus:
        """The interface and every peer with handshake time and rx/tx counters."""

    @abstractmethod
    async def _set(
        self,
        ops: Sequence[PeerOp],
        *,
        private_key: PrivateKey | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
    ) -> None:
        """Apply one set operation atomically (as far as the backend allows)."""

    @abstractmethod
    async def close(self) -> None:
        """Remove the interface (and stop whatever process carries it)."""

    async def carrier_lost(self) -> str:
        """Return (why) when whatever carries the interface died by itself: a supervising
        owner then rebuilds the device. The kernel's interface has no process: never."""
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def configure(self, config: DeviceConfig) -> bool:
        """Set private key / listen port / fwmark where they differ; True if anything changed."""
        change = diff_device(config, await self.status())
        if change is None:
            return False
        await self._set(
            (),
            private_key=change.private_key,
            listen_port=change.listen_port,
            fwmark=change.fwmark,
        )
        return True

    async def apply(self, ops: Sequence[PeerOp]) -> None:
        """Apply peer operations as they are (see `diff_peers` for how to build them)."""
        if ops:
            await self._set(ops)

    async def sync_peers(self, desired: Iterable[PeerConfig]) -> tuple[PeerOp, ...]:
        """Make the peer set equal ``desired``, touching only peers that differ.

        Returns the operations applied (empty when the device already matched).
        """
        current = await self.status()
        ops = diff_peers(desired, [p.config for p in current.peers])
        await self.apply(ops)
        return ops

    async def remove_peers(self, public_keys: Iterable[str]) -> None:
        await self.apply([PeerOp(public_key=k, remove=True) for k in public_keys])

    async def set_address(self, cidr: str) -> None:
        """Give the interface a tunnel address (``10.4.0.1/16``) and bring it up."""
        await _ns.add_address(self.netns, self.ifname, cidr)
        await self.up()

    async def up(self) -> None:
        await _ns.link_up(self.netns, self.ifname)

    async def add_route(self, dst: str) -> None:
        """Route ``dst`` into the tunnel (the interface is point-to-point: no gateway)."""
        await _ns.add_route(self.netns, dst, ifname=self.ifname)


class WireGuardBackend(ABC):
    """Creates devices; `unavailable_reason` says why it cannot run here (None: it can)."""

    name: str

    @abstractmethod
    async def unavailable_reason(self) -> str | None:
        """Probe the host once; a one-line reason when this backend cannot work."""

    @abstractmethod
    async def create(self, ifname: str, netns: str | None = None) -> WireGuardDevice:
        """A new, empty interface; raises `DeviceError` if it cannot be created."""
