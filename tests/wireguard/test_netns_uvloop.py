"""The netlink operations work under uvloop, the gateway's data-plane loop.

uvloop refuses pyroute2's AF_NETLINK datagram endpoints ("cannot open a UDP handle, invalid
family 16"): `netns` carries them out on a stock loop thread. Without that, `pydstack up` and
the gateway node fail at their first netlink call when uvloop is installed."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading

import pytest

from pydstack.adapters.wireguard import netns as ns

uvloop = pytest.importorskip("uvloop")


def test_namespace_links_addresses_and_routes_under_uvloop() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"pdu{secrets.token_hex(3)}"

    async def scenario() -> tuple[list[str], list[tuple[str, str]], bool, str]:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with ns.temporary_netns(name):
            await ns.add_veth(name, "ua", name, "ub")
            await ns.add_address(name, "ua", "10.77.0.1/24")
            await ns.add_route(name, "10.78.0.0/16", ifname="ua")
            routes = [dst for dst, _ in await ns.routes(name)]
            found = await ns.addresses_in(name, "10.77.0.0/16")
            await ns.delete_link(name, "ua")
            gone = not await ns.link_exists(name, "ub")  # a veth's peer goes with it
            return routes, found, gone, threading.current_thread().name

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        routes, found, gone, thread = runner.run(scenario())
    assert "10.78.0.0/16" in routes and "10.77.0.0/24" in routes
    assert found == [("ua", "10.77.0.1/24")]
    assert gone and thread == "MainThread"
    assert not ns.netns_exists(name)


async def test_under_the_stock_loop_calls_run_in_place() -> None:
    """No thread hop on the stock loop: the decorator only steps in for other loops."""
    seen: list[str] = []

    @ns.on_stock_loop
    async def where() -> None:
        seen.append(threading.current_thread().name)

    await where()
    assert seen == [threading.current_thread().name]

    def under_uvloop() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(where())

    await asyncio.to_thread(under_uvloop)  # a loop of its own, off this running one
    assert seen[-1] == "netlink"
