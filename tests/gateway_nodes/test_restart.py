"""1000 registrations from concurrent writers while 3 gateway node processes follow the log:
a node killed with -9 mid-stream and restarted, and a fourth node started afterwards, hold the
same table and WireGuard peer set as the others (real wireguard-go, real NATS)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from pydstack.actors.gateway import ClusterView, Registrar, RegistrarConfig
from pydstack.actors.gateway.node import table_peer_digest
from pydstack.core.gateway.cluster import AddressPlan, Admission, RegisterRequest

from .conftest import Cluster
from .procs import get_json, wait_identical

N = 1000
WRITERS = 4


def _request(i: int) -> RegisterRequest:
    from pydstack.adapters.wireguard import PrivateKey

    return RegisterRequest(
        app_id=hashlib.sha1(b"app %d" % (i % 37)).hexdigest(),
        instance_id=hashlib.sha1(b"instance %d" % i).hexdigest(),
        compose_hash=hashlib.sha256(b"compose %d" % (i % 37)).hexdigest(),
        wg_public_key=PrivateKey.generate().public_key().b64,
    )


@pytest.mark.timeout(150)
async def test_kill9_restart_and_late_node_converge(cluster: Cluster) -> None:
    """kill -9 during 1000 concurrent registrations, restart: identical digests and device
    peer sets on every node, equal to a fresh fold; a 4th node started later: identical."""
    gw1, gw2, gw3 = await asyncio.gather(*(cluster.node(n) for n in (1, 2, 3)))
    plan = AddressPlan(cluster.lan.client_range)
    registrars = [
        Registrar(cluster.store, RegistrarConfig(node_id=f"gw{1 + w % 3}", plan=plan))
        for w in range(WRITERS)
    ]
    registered = 0
    killed = asyncio.Event()

    async def writer(w: int) -> None:
        nonlocal registered
        mine = [_request(i) for i in range(w, N, WRITERS)]
        for k in range(0, len(mine), 10):
            outs = await registrars[w].register_many(mine[k : k + 10])
            assert all(isinstance(o, Admission) for o in outs), outs
            registered += len(outs)
            if registered >= N * 0.4 and not killed.is_set():
                killed.set()
                gw2.kill9()

    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    assert killed.is_set() and gw2.proc is not None
    assert await gw2.proc.wait() == -9
    await gw2.start()  # same state dir: same key; its stale interface is replaced
    statuses = await wait_identical([gw1, gw2, gw3], min_peers=N, timeout=60)

    view = ClusterView(cluster.store, "default")
    await view.catch_up()
    table = view.table()
    assert len(table.peers) == N
    assert len({r.tunnel_ip for r in table.routes}) == N  # no address handed out twice
    assert {s["table_digest"] for s in statuses} == {table.digest()}
    assert {s["device_peer_digest"] for s in statuses} == {table_peer_digest(table)}
    peers = await get_json(gw2.admin + "/peers")
    assert sorted(p["public_key"] for p in peers["peers"]) == sorted(
        p.public_key for p in table.peers
    )

    gw4 = await cluster.node(4)
    statuses = await wait_identical([gw1, gw2, gw3, gw4], min_peers=N, timeout=60)
    await view.catch_up()  # gw4's join changed the gateway list, not the peers
    assert {s["table_digest"] for s in statuses} == {view.table().digest()}
    assert {s["device_peer_digest"] for s in statuses} == {table_peer_digest(table)}
    assert sorted(s["gateways"] for s in statuses)[0] == ["gw1", "gw2", "gw3", "gw4"]
    for r in registrars:
        await r.aclose()
