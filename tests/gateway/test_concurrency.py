"""Against a real nats-server: concurrent registrars never hand out an address twice, every
node's fold ends with the same table, and concurrent recyclers write one event per instance."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from pydstack.actors.gateway import ClusterView, RecycleConfig, Recycler, Registrar, RegistrarConfig
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.core.events import (
    CvmRecycled,
    GatewayNodeJoined,
    Signer,
    TunnelIpAllocated,
    TunnelIpReleased,
    decode_body,
    open_envelope,
)
from pydstack.core.gateway.cluster import AddressPlan, Admission

from .given import key, request

PLAN = AddressPlan("10.4.0.0/20", ())
N = 1000
WRITERS = 8


async def _connect(server: NatsServer, name: str) -> EventStore:
    store = await EventStore.connect(server.url, Signer.from_private_bytes(name, os.urandom(32)))
    await store.ensure_stream()
    return store


@pytest.fixture
async def stores(nats_server: NatsServer) -> AsyncIterator[list[EventStore]]:
    out = [await _connect(nats_server, f"gw-{i}") for i in range(WRITERS)]
    try:
        yield out
    finally:
        for s in out:
            await s.close()


async def _join_nodes(registrar: Registrar) -> None:
    for n in range(3):
        node = GatewayNodeJoined(
            node_id=f"gw{n}",
            wg_public_key=key(10_000 + n),
            tunnel_ip=f"10.4.0.{n + 1}",
            endpoint=f"192.0.2.{n + 1}:51820",
            base_domain="gw.example.com",
        )
        assert await registrar.join(node) == node


async def _all_events(store: EventStore) -> list[object]:
    return [decode_body(open_envelope(r.data)) async for r in store.read()]


@pytest.mark.timeout(120)
async def test_1000_concurrent_registrations_and_identical_tables(
    stores: list[EventStore],
) -> None:
    """8 writers race for addresses while 3 nodes fold; one node dies mid-stream and starts
    over, a 4th starts afterwards: no address twice, the same table digest everywhere."""
    registrars = [Registrar(s, RegistrarConfig(plan=PLAN)) for s in stores]
    await _join_nodes(registrars[0])
    nodes = [ClusterView(stores[i], "default") for i in range(3)]
    reqs = [request(i, i % 17, i) for i in range(N)]

    async def writer(w: int) -> list[Admission]:
        # each writer has many registrations in flight, like a busy RegisterCvm endpoint
        out = await asyncio.gather(*(registrars[w].register(r) for r in reqs[w::WRITERS]))
        assert all(isinstance(a, Admission) for a in out)
        return [a for a in out if isinstance(a, Admission)]

    async with nodes[0].following(0.05), nodes[1].following(0.05):
        async with nodes[2].following(0.05):
            writers = asyncio.gather(*(writer(w) for w in range(WRITERS)))
            while nodes[2].cursor < 300:  # noqa: ASYNC110 - node 2 is killed mid-stream...
                await asyncio.sleep(0.01)
        killed_at = nodes[2].cursor
        restarted = ClusterView(stores[2], "default")  # ...and restarts from the log
        async with restarted.following(0.05):
            admissions = [a for batch in await writers for a in batch]
            await asyncio.sleep(0.2)
            for v in (nodes[0], nodes[1], restarted):
                await v.catch_up()
    late = ClusterView(stores[3], "default")
    await late.catch_up()

    ips = [a.tunnel_ip for a in admissions]
    assert len(ips) == N and len(set(ips)) == N
    assert not {"10.4.0.1", "10.4.0.2", "10.4.0.3"} & set(ips)  # node addresses skipped
    ledger = [e for e in await _all_events(stores[0]) if isinstance(e, TunnelIpAllocated)]
    assert len(ledger) == N and len({e.tunnel_ip for e in ledger}) == N
    assert 0 < killed_at < nodes[0].cursor
    tables = [v.table() for v in (nodes[0], nodes[1], restarted, late)]
    assert {t.digest() for t in tables} == {tables[0].digest()}
    assert {t.encode() for t in tables} == {tables[0].encode()}
    assert len(tables[0].routes) == N and len(tables[0].peers) == N
    assert sorted(r.tunnel_ip for r in tables[0].routes) == sorted(ips)
    # lowest-free allocation with nothing released: exactly the first N free addresses
    assert max(int(ip.split(".")[2]) * 256 + int(ip.split(".")[3]) for ip in ips) == N + 3


@pytest.mark.timeout(60)
async def test_concurrent_recyclers_write_one_event_per_stale_instance(
    stores: list[EventStore],
) -> None:
    registrar = Registrar(stores[0], RegistrarConfig(plan=PLAN))
    await _join_nodes(registrar)
    for i in range(60):
        assert isinstance(await registrar.register(request(i, 1, i)), Admission)
    timeout = 600
    now = int(time.time()) + timeout + 5  # every instance is stale by then
    recyclers = [
        Recycler(ClusterView(s, "default"), RecycleConfig(timeout_s=timeout, chunk=7))
        for s in stores[:3]
    ]
    done = await asyncio.gather(*(r.recycle_once(now) for r in recyclers))
    assert sorted(i for d in done for i in d) == sorted(
        request(i, 1, i).instance_id for i in range(60)
    )
    events = await _all_events(stores[0])
    recycled = Counter(e.instance_id for e in events if isinstance(e, CvmRecycled))
    released = Counter(e.instance_id for e in events if isinstance(e, TunnelIpReleased))
    assert len(recycled) == 60 and set(recycled.values()) == {1}
    assert released == recycled
    view = ClusterView(stores[4], "default")
    await view.catch_up()
    assert view.table().routes == () and view.state.leases == {}
    # a recycled instance comes back only by registering again, at the lowest free address
    again = await registrar.register(request(7, 1, 7))
    assert isinstance(again, Admission) and again.tunnel_ip == "10.4.0.4"
