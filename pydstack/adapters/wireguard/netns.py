"""Network namespaces, veth pairs, addresses and routes through pyroute2 (netlink, no `ip`).

``netns=None`` everywhere means the caller's (host) namespace. Errors come out as
`NetnsError` naming the object and the operation.

Usage::

    await create_netns("gw1")
    await add_veth("gw1", "ve-gw", "cvm1", "ve-cvm")
    await add_address("gw1", "ve-gw", "10.9.0.1/30")
    await link_up("gw1", "ve-gw")
    await add_unreachable_route(None, "10.9.0.0/16")   # host: never route test subnets out
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]  # pyroute2 ships no stubs
from pyroute2 import netns as _netns
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]  # no stubs

from .errors import NetnsError


def _forget_parent_signals() -> None:
    """In a forked child: drop the parent's signal wakeup fd and handlers.

    pyroute2 runs each namespace's netlink socket in a child forked with multiprocessing. The
    child inherits asyncio's ``signal.set_wakeup_fd`` socket, shared with the parent: a SIGTERM
    ending that helper was written into it and the parent's event loop ran *its* SIGTERM
    handler (a guest or `attest simulate` powered off right after bringing up WireGuard)."""
    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


os.register_at_fork(after_in_child=_forget_parent_signals)

_P = ParamSpec("_P")
_T = TypeVar("_T")
_netlink_loop: asyncio.AbstractEventLoop | None = None
_netlink_lock = threading.Lock()


def _stock_loop() -> asyncio.AbstractEventLoop:
    """A stock asyncio loop on a thread of its own, started on first use.

    The thread is created by the caller's thread, so it starts in the caller's network
    namespace (a process that entered one before serving keeps it here too)."""
    global _netlink_loop
    with _netlink_lock:
        if _netlink_loop is None or _netlink_loop.is_closed():
            loop = asyncio.SelectorEventLoop()
            threading.Thread(target=loop.run_forever, name="netlink", daemon=True).start()
            _netlink_loop = loop
        return _netlink_loop


def on_stock_loop(
    fn: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Run a pyroute2 coroutine on a stock asyncio loop.

    pyroute2 hands its netlink sockets to ``loop.create_datagram_endpoint``, which uvloop
    refuses for AF_NETLINK ("cannot open a UDP handle, invalid family 16"). Under a stock
    loop the call runs in place; under uvloop (the gateway's data plane) it is carried out on
    `_stock_loop` and awaited from here."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        if isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
            return await fn(*args, **kwargs)
        done = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), _stock_loop())
        return await asyncio.wrap_future(done)

    return wrapper


NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


@on_stock_loop
async def create_netns(name: str) -> None:
    """Create a named namespace (like `ip netns add`) with its loopback up."""
    try:
        await asyncio.to_thread(_netns.create, name)
    except (OSError, NetlinkError) as exc:
        raise NetnsError(f"create netns {name!r}: {exc}") from exc
    await link_up(name, "lo")


@on_stock_loop
async def delete_netns(name: str) -> None:
    """Remove a named namespace; links inside it go with it. Missing is not an error."""
    if not netns_exists(name):
        return
    try:
        await asyncio.to_thread(_netns.remove, name)
    except (OSError, NetlinkError) as exc:
        raise NetnsError(f"delete netns {name!r}: {exc}") from exc


@asynccontextmanager
async def temporary_netns(name: str) -> AsyncIterator[str]:
    """A namespace that exists for the duration of the block."""
    await create_netns(name)
    try:
        yield name
    finally:
        await delete_netns(name)


@asynccontextmanager
async def _ipr(netns: str | None) -> AsyncIterator[AsyncIPRoute]:
    ipr = AsyncIPRoute(netns=netns) if netns else AsyncIPRoute()
    async with ipr:
        yield ipr


async def _index(ipr: AsyncIPRoute, netns: str | None, ifname: str) -> int:
    found = await ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(f"no link {ifname!r} in netns {netns or '<host>'}")
    return int(found[0])


async def _run(what: str, netns: str | None, op: Any) -> None:
    try:
        await op
    except NetlinkError as exc:
        raise NetnsError(f"{what} in netns {netns or '<host>'}: {exc}") from exc


@on_stock_loop
async def link_exists(netns: str | None, ifname: str) -> bool:
    async with _ipr(netns) as ipr:
        return bool(await ipr.link_lookup(ifname=ifname))


@on_stock_loop
async def link_up(netns: str | None, ifname: str) -> None:
    async with _ipr(netns) as ipr:
        idx = await _index(ipr, netns, ifname)
        await _run(f"set {ifname} up", netns, ipr.link("set", index=idx, state="up"))


@on_stock_loop
async def delete_link(netns: str | None, ifname: str) -> None:
    """Delete a link; a missing link is not an error."""
    async with _ipr(netns) as ipr:
        found = await ipr.link_lookup(ifname=ifname)
        if found:
            await _run(f"delete {ifname}", netns, ipr.link("del", index=found[0]))


@on_stock_loop
async def add_veth(netns_a: str | None, ifname_a: str, netns_b: str, ifname_b: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    async with _ipr(netns_a) as ipr:
        peer = {"ifname": ifname_b, "net_ns_fd": netns_b}
        op = ipr.link("add", ifname=ifname_a, kind="veth", peer=peer)
        await _run(f"add veth {ifname_a}<->{netns_b}/{ifname_b}", netns_a, op)
    await link_up(netns_a, ifname_a)
    await link_up(netns_b, ifname_b)


@on_stock_loop
async def add_address(netns: str | None, ifname: str, cidr: str) -> None:
    """Add ``addr/prefix`` to a link; adding an address it already has is not an error."""
    iface = ipaddress.ip_interface(cidr)
    async with _ipr(netns) as ipr:
        idx = await _index(ipr, netns, ifname)
        try:
            await ipr.addr(
                "add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST: already there, the goal is met
                raise NetnsError(f"add {cidr} to {ifname} in {netns or '<host>'}: {exc}") from exc


@on_stock_loop
async def addresses(netns: str | None, ifname: str) -> list[str]:
    """The ``addr/prefix`` strings on a link."""
    async with _ipr(netns) as ipr:
        idx = await _index(ipr, netns, ifname)
        out = []
        async for msg in await ipr.addr("dump", index=idx):
            out.append(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
        return out


@on_stock_loop
async def addresses_in(netns: str | None, network: str) -> list[tuple[str, str]]:
    """(link name, ``addr/prefix``) of every IPv4 address in the namespace whose network
    overlaps ``network``."""
    net = ipaddress.IPv4Network(network, strict=False)
    async with _ipr(netns) as ipr:
        names = {}
        async for link in await ipr.link("dump"):
            names[link["index"]] = str(link.get("IFLA_IFNAME"))
        out = []
        async for msg in await ipr.addr("dump", family=socket.AF_INET):
            cidr = f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}"
            if ipaddress.IPv4Network(cidr, strict=False).overlaps(net):
                out.append((names.get(msg["index"], "?"), cidr))
        return out


@on_stock_loop
async def add_route(
    netns: str | None, dst: str, *, ifname: str | None = None, gateway: str | None = None
) -> None:
    """A unicast route to ``dst`` via a link and/or gateway; an existing one is kept."""
    net = ipaddress.ip_network(dst, strict=False)
    kwargs: dict[str, Any] = {"dst": str(net)}
    async with _ipr(netns) as ipr:
        if ifname is not None:
            kwargs["oif"] = await _index(ipr, netns, ifname)
        if gateway is not None:
            kwargs["gateway"] = gateway
        try:
            await ipr.route("add", **kwargs)
        except NetlinkError as exc:
            if exc.code != 17:
                raise NetnsError(f"add route {dst} in {netns or '<host>'}: {exc}") from exc


@on_stock_loop
async def add_unreachable_route(netns: str | None, dst: str) -> None:
    """An ``unreachable`` route: traffic to ``dst`` fails locally instead of leaving the host."""
    net = ipaddress.ip_network(dst, strict=False)
    async with _ipr(netns) as ipr:
        try:
            await ipr.route("add", dst=str(net), type="unreachable")
        except NetlinkError as exc:
            if exc.code != 17:
                raise NetnsError(f"add unreachable {dst} in {netns or '<host>'}: {exc}") from exc


@on_stock_loop
async def delete_route(netns: str | None, dst: str, *, unreachable: bool = False) -> None:
    """Delete a route to ``dst``; a missing route is not an error."""
    net = ipaddress.ip_network(dst, strict=False)
    kwargs: dict[str, Any] = {"dst": str(net)}
    if unreachable:
        kwargs["type"] = "unreachable"
    async with _ipr(netns) as ipr:
        try:
            await ipr.route("del", **kwargs)
        except NetlinkError as exc:
            if exc.code not in (3, 2):  # ESRCH / ENOENT: already gone
                raise NetnsError(f"delete route {dst} in {netns or '<host>'}: {exc}") from exc


@on_stock_loop
async def routes(netns: str | None) -> list[tuple[str, int]]:
    """(destination CIDR, route type) for every IPv4 route in the main table."""
    async with _ipr(netns) as ipr:
        out = []
        async for msg in await ipr.route("dump", family=2, table=254):
            dst = msg.get("RTA_DST") or "0.0.0.0"
            out.append((f"{dst}/{msg['dst_len']}", int(msg["type"])))
        return out


def socket_in_netns(
    netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket that lives in ``netns``, usable from any thread of this process.

    A socket stays in the namespace it was created in, so a short-lived thread enters the
    namespace (setns only changes the calling thread), creates the socket and exits; the
    caller's threads never change namespace.
    """
    out: list[socket.socket | BaseException] = []

    def enter_and_create() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            out.append(socket.socket(family, type))
        except BaseException as exc:  # handed to the caller's thread below
            out.append(exc)

    worker = threading.Thread(target=enter_and_create, name=f"netns-{netns}")
    worker.start()
    worker.join()
    result = out[0]
    if isinstance(result, BaseException):
        raise NetnsError(f"socket in netns {netns!r}: {result}") from result
    return result
