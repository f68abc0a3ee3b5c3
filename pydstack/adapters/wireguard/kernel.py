"""Kernel backend: a ``wireguard`` link configured over generic netlink (pyroute2).

Needs the wireguard kernel module (built in or loadable). `unavailable_reason` probes by
creating a throw-away wireguard link in a scratch namespace, so the reason it reports is
the kernel's own answer (e.g. ``NetlinkError 95: Operation not supported``).

Usage::

    backend = KernelBackend()
    if reason := await backend.unavailable_reason():
        ...  # fall back to UserspaceBackend
    async with await backend.create("wg0", netns="gw1") as dev:
        ...
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from typing import Any

from pyroute2 import AsyncIPRoute, AsyncWireGuard  # type: ignore[import-untyped]  # no stubs
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]  # no stubs

from . import netns as _ns
from .device import WireGuardBackend, WireGuardDevice
from .errors import DeviceError, NetnsError
from .keys import PrivateKey
from .model import DeviceStatus, PeerOp, PeerStatus, normalize_cidr, split_endpoint
from .netns import on_stock_loop


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _peer_dict(op: PeerOp) -> dict[str, Any]:
    peer: dict[str, Any] = {"public_key": op.public_key}
    if op.remove:
        peer["remove"] = True
        return peer
    if op.update_only:
        peer["update_only"] = True
    if op.endpoint is not None:
        addr, port = split_endpoint(op.endpoint)
        peer["endpoint_addr"], peer["endpoint_port"] = addr, port
    if op.persistent_keepalive is not None:
        peer["persistent_keepalive"] = op.persistent_keepalive
    if op.replace_allowed_ips:
        peer["replace_allowed_ips"] = True
    if op.allowed_ips or op.replace_allowed_ips:
        peer["allowed_ips"] = [normalize_cidr(c) for c in op.allowed_ips]
    return peer


def _peer_status(nla: Any) -> PeerStatus:
    endpoint = None
    ep = nla.get_attr("WGPEER_A_ENDPOINT")
    if ep is not None and ep.get("port"):
        addr = ep["addr"]
        endpoint = f"[{addr}]:{ep['port']}" if ":" in addr else f"{addr}:{ep['port']}"
    handshake = None
    hs = nla.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    if hs is not None and (hs["tv_sec"] or hs["tv_nsec"]):
        handshake = hs["tv_sec"] + hs["tv_nsec"] / 1e9
    ips = [normalize_cidr(a["addr"]) for a in nla.get_attr("WGPEER_A_ALLOWEDIPS") or ()]
    return PeerStatus(
        public_key=_text(nla.get_attr("WGPEER_A_PUBLIC_KEY")),
        allowed_ips=tuple(sorted(set(ips))),
        endpoint=endpoint,
        persistent_keepalive=int(nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
        last_handshake=handshake,
        rx_bytes=int(nla.get_attr("WGPEER_A_RX_BYTES") or 0),
        tx_bytes=int(nla.get_attr("WGPEER_A_TX_BYTES") or 0),
        protocol_version=int(nla.get_attr("WGPEER_A_PROTOCOL_VERSION") or 1),
    )


class KernelDevice(WireGuardDevice):
    """A kernel ``wireguard`` link."""

    async def _wg(self) -> AsyncWireGuard:
        wg = AsyncWireGuard(netns=self.netns) if self.netns else AsyncWireGuard()
        await wg.setup_endpoint()
        return wg

    @on_stock_loop
    async def status(self) -> DeviceStatus:
        wg = await self._wg()
        try:
            msgs = [m async for m in await wg.info(self.ifname)]
        except NetlinkError as exc:
            raise DeviceError(f"wireguard get {self.ifname}: {exc}") from exc
        finally:
            wg.close()
        public_key: str | None = None
        listen_port = fwmark = 0
        peers: list[PeerStatus] = []
        for msg in msgs:  # large peer sets arrive split over several messages
            if (pk := msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) is not None:
                public_key = _text(pk)
            listen_port = int(msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port)
            fwmark = int(msg.get_attr("WGDEVICE_A_FWMARK") or fwmark)
            peers.extend(_peer_status(p) for p in msg.get_attr("WGDEVICE_A_PEERS") or ())
        return DeviceStatus(
            public_key=public_key, listen_port=listen_port, fwmark=fwmark, peers=tuple(peers)
        )

    @on_stock_loop
    async def _set(
        self,
        ops: Sequence[PeerOp],
        *,
        private_key: PrivateKey | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
    ) -> None:
        wg = await self._wg()
        try:
            if private_key is not None or listen_port is not None or fwmark is not None:
                key = private_key.b64 if private_key is not None else None
                await wg.set(self.ifname, private_key=key, listen_port=listen_port, fwmark=fwmark)
            for op in ops:  # pyroute2 sends one peer per message
                await wg.set(self.ifname, peer=_peer_dict(op))
        except NetlinkError as exc:
            raise DeviceError(f"wireguard set {self.ifname}: {exc}") from exc
        finally:
            wg.close()

    @on_stock_loop
    async def close(self) -> None:
        await _ns.delete_link(self.netns, self.ifname)


class KernelBackend(WireGuardBackend):
    """WireGuard in the kernel, driven through pyroute2's WireGuard netlink family."""

    name = "kernel"

    @on_stock_loop
    async def unavailable_reason(self) -> str | None:
        if os.geteuid() != 0:
            return "the kernel backend needs root (CAP_NET_ADMIN)"
        # unique: two nodes of one process may probe at once
        scratch = f"pdwgprobe{os.getpid()}-{secrets.token_hex(3)}"
        try:
            async with _ns.temporary_netns(scratch):
                async with AsyncIPRoute(netns=scratch) as ipr:
                    await ipr.link("add", ifname="wgprobe", kind="wireguard")
                wg = AsyncWireGuard(netns=scratch)
                try:
                    await wg.setup_endpoint()
                finally:
                    wg.close()
        except NetlinkError as exc:
            return f"no wireguard kernel module: NetlinkError {exc.code} ({os.strerror(exc.code)})"
        except (NetnsError, OSError) as exc:
            return f"cannot probe the wireguard kernel module: {exc}"
        return None

    @on_stock_loop
    async def create(self, ifname: str, netns: str | None = None) -> KernelDevice:
        try:
            async with AsyncIPRoute(netns=netns) if netns else AsyncIPRoute() as ipr:
                await ipr.link("add", ifname=ifname, kind="wireguard")
        except NetlinkError as exc:
            raise DeviceError(
                f"create wireguard link {ifname} in {netns or '<host>'}: {exc}"
            ) from exc
        return KernelDevice(ifname, netns)
